"""TinyTL lite residual branches added to a frozen model's blocks.

Cai, Gan, Zhu & Han (2020), "TinyTL: Reduce Memory, Not Parameters for
Efficient On-Device Learning", Section 3.2: freezing the weights and training
only biases saves the activations that weight gradients need, but limits
what the model can learn; TinyTL adds to each block a small *lite residual*
branch that sees a 2x-downsampled copy of the block's input, so that the
activations its own weight gradients need are 4x smaller than the block's.

Branch (one per block): avg-pool by `downsample` -> 3x3 group conv
(`expand` x the input channels, groups of `group_width` channels) -> group
norm -> ReLU -> 1x1 conv to the block's output channels -> nearest upsample
-> added to the output of the block's last module. The 1x1 conv starts at
zero, so a freshly wrapped model computes exactly what the backbone did.

The backbone is not rewritten: `LiteResidualModel` intercepts the calls of
the named submodules (flax `nn.intercept_methods`), records the input of a
block's first module and adds the branch to the output of its last one.

    model = LiteResidualModel(backbone, blocks=dscnn_blocks(4))
    variables = from_pretrained(model, pretrained_variables, x, key)
    rules = lite_residual_rules()          # biases + branches + classifier

Parameter paths: 'backbone/<backbone path>' and 'lite_residual{i}/...'.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax

from ondevice.models import layers
from sparse_updates.rules import TRAIN, Rules

BRANCH_PREFIX = 'lite_residual'


class LiteResidual(nn.Module):
  """One lite residual branch: [B, H, W, Cin] -> [B, H', W', Cout].

  Attributes:
    downsample: spatial pooling factor of the branch's input (TinyTL: 2).
    expand: width of the group conv relative to the input channels.
    group_width: channels per group of the 3x3 conv.
  """
  downsample: int = 2
  expand: int = 1
  group_width: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, out_shape: Sequence[int]) -> jax.Array:
    if x.ndim != 4 or len(out_shape) != 4:
      raise ValueError(
          f'Lite residual branches join convolutional blocks [B, H, W, C]; '
          f'got input {x.shape} and output {tuple(out_shape)}. Name conv '
          'modules in `blocks`.')
    cin = x.shape[-1]
    width = cin * self.expand
    groups = max(cin // self.group_width, 1)
    if cin % groups or width % groups:
      raise ValueError(f'group_width={self.group_width} must divide the '
                       f'block input channels ({cin}).')
    d = self.downsample
    if d > 1:
      x = nn.avg_pool(x, (d, d), strides=(d, d), padding='SAME')
    x = nn.Conv(width, (3, 3), padding='SAME', feature_group_count=groups,
                name='group_conv')(x)
    x = nn.GroupNorm(num_groups=layers.group_count(width), name='norm')(x)
    x = nn.relu(x)
    x = nn.Conv(out_shape[-1], (1, 1), kernel_init=nn.initializers.zeros,
                name='project')(x)
    if tuple(x.shape[1:3]) != tuple(out_shape[1:3]):
      x = jax.image.resize(x, tuple(x.shape[:1]) + tuple(out_shape[1:]),
                           'nearest')
    return x


class LiteResidualModel(nn.Module):
  """A backbone with a lite residual branch around each of `blocks`.

  Attributes:
    backbone: the (frozen) flax model, e.g. `build_model('ds_cnn_s', 12)`.
    blocks: (first module, last module) names of each block, as children of
      the backbone (e.g. ('dw1', 'pw1')); the branch reads the first
      module's input and adds to the last module's output.
    downsample, expand, group_width: see `LiteResidual`.
  """
  backbone: nn.Module
  blocks: Sequence[tuple[str, str]]
  downsample: int = 2
  expand: int = 1
  group_width: int = 8

  def setup(self):
    if not self.blocks:
      raise ValueError('blocks is empty; pass (first, last) module names, '
                       'e.g. dscnn_blocks(4).')
    self.branches = [
        LiteResidual(self.downsample, self.expand, self.group_width,
                     name=f'{BRANCH_PREFIX}{i}')
        for i in range(1, len(self.blocks) + 1)]

  @property
  def accepts_mask(self) -> bool:
    return getattr(self.backbone, 'accepts_mask', False)

  def _run(self, method: str, x: jax.Array, train: bool, **kwargs):
    firsts = {first: i for i, (first, _) in enumerate(self.blocks)}
    lasts = {last: i for i, (_, last) in enumerate(self.blocks)}
    block_inputs: dict[int, jax.Array] = {}
    seen: set[str] = set()
    # Shape of the latest feature map [B, H, W, C]: a module that works on
    # flattened pixels (a 1x1 conv as a Dense over [B*H*W, C]) returns 2-D
    # outputs, and the branch output is flattened the same way.
    feature_map = [None]

    def interceptor(next_fun, args, kw, context):
      path = tuple(context.module.path)
      if (context.method_name != '__call__' or len(path) != 2 or
          path[0] != 'backbone'):
        return next_fun(*args, **kw)
      name = path[1]
      if name in firsts:
        block_inputs[firsts[name]] = args[0]
      out = next_fun(*args, **kw)
      if out.ndim == 4:
        feature_map[0] = out.shape
      if name in lasts:
        i = lasts[name]
        if i not in block_inputs:
          raise ValueError(f'Block {self.blocks[i]}: module {name!r} ran '
                           'before the block\'s first module; check blocks.')
        seen.add(name)
        out = out + self._branch_output(i, block_inputs[i], out,
                                        feature_map[0])
      return out

    with nn.intercept_methods(interceptor):
      fn = getattr(self.backbone, method)
      out = fn(x, train=train, **kwargs)
    missing = sorted({last for _, last in self.blocks} - seen)
    if missing:
      raise ValueError(f'Modules {missing} named in blocks never ran in the '
                       'backbone; valid names are its direct children, e.g. '
                       "'dw1', 'pw1'.")
    return out

  def _branch_output(self, i: int, block_input: jax.Array, out: jax.Array,
                     feature_map) -> jax.Array:
    if out.ndim == 4:
      return self.branches[i](block_input, out.shape)
    if (out.ndim == 2 and feature_map is not None and
        out.shape[0] == math.prod(feature_map[:3])):
      target = tuple(feature_map[:3]) + (out.shape[-1],)
      return self.branches[i](block_input, target).reshape(out.shape)
    raise ValueError(
        f'Block {self.blocks[i]} ends in an output of shape {out.shape}, '
        'which is neither a feature map [B, H, W, C] nor its pixels '
        '[B*H*W, C]; end the block at a convolution.')

  def __call__(self, x: jax.Array, train: bool = False, **kwargs):
    return self._run('__call__', x, train, **kwargs)

  def features(self, x: jax.Array, train: bool = False):
    return self._run('features', x, train)


def dscnn_blocks(num_blocks: int = 4) -> tuple[tuple[str, str], ...]:
  """The depthwise-separable blocks of `ondevice.models.DSCNN`."""
  return tuple((f'dw{i}', f'pw{i}') for i in range(1, num_blocks + 1))


def from_pretrained(model: LiteResidualModel, variables: Any,
                    example_x: jax.Array, rng: jax.Array) -> dict[str, Any]:
  """Puts pre-trained `variables` under 'backbone' and initialises branches.

  Only the branches are initialised (flax initialises just the variables
  that are missing), so the backbone is exactly the pre-trained one.

  Args:
    model: the wrapper.
    variables: the backbone's variables ({'params': ..., 'batch_stats': ...}).
    example_x: an input batch (values unused).
    rng: key for the branches' initialisation.

  Returns:
    The wrapper's variables.

  Raises:
    ValueError: when `variables` do not cover the backbone's parameters.
  """
  nested = {c: {'backbone': tree} for c, tree in dict(variables).items()}

  def init_branches(nested, x, rng):
    return model.apply(nested, x, mutable=True, rngs={'params': rng})[1]

  shapes = jax.eval_shape(init_branches, nested, example_x, rng)
  for collection, tree in shapes.items():
    got = jax.tree.structure(dict(variables).get(collection, {}))
    want = jax.tree.structure(tree['backbone'])
    if got != want:
      raise ValueError(
          f'The pre-trained {collection!r} do not cover the backbone: got '
          f'{got}, the backbone has {want}. Pass the variables of the model '
          'given as `backbone`.')
  return dict(jax.jit(init_branches)(nested, example_x, rng))


def lite_residual_rules(head: bool = True) -> Rules:
  """TinyTL's scheme: biases, lite residual branches and the classifier."""
  return (([(r'(.*/)?classifier/.*', TRAIN)] if head else []) +
          [(rf'{BRANCH_PREFIX}\d+/.*', TRAIN), ('.*/bias', TRAIN),
           ('.*', None)])
