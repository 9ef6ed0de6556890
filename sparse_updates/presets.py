"""Named update schemes: `get_rules(name, params=None, **kw)`.

Each preset returns ordered rules (see `sparse_updates.rules`):

  full             every parameter trains.
  bias_only        every bias, including the norms' (BitFit: Ben Zaken et
                   al., 2022; TinyTL: Cai et al., 2020, "TinyTL: Reduce
                   Memory, Not Parameters for Efficient On-Device Learning"),
                   plus the classifier (head=True), as both papers do.
  norm_only        the norms' scale and bias, plus the classifier.
  classifier_only  the classifier alone (linear probing).
  last_k           every leaf of the last k layers.
  sparse_channels  a fraction of each kernel's output channels, plus biases
                   and the classifier (channel masks: `channel_masks`).
  tte              the sparse update of the Tiny Training Engine (Lin et al.,
                   2022, "On-Device Training Under 256KB Memory"): biases of
                   the last k layers plus the weights (or a fraction of
                   their channels) of chosen layers, plus the classifier.
  lite_residual    TinyTL: biases, lite residual branches and classifier
                   (for models wrapped by `lite_residual.LiteResidualModel`).

A *layer* is a module that owns a 'kernel', together with the parameter-only
modules (norms) that follow it in the parameter tree: for DS-CNN that is
conv0, dw1, pw1, ..., pw4, classifier, each with its norm. Layers are in the
order `model.init` created them (call order); jit outputs and jax.tree.map
return trees with sorted keys, which lose that order, so for those pass
`layer_order=forward_order(model, variables, x)` (an error says so).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.extend import core as jex_core

from ondevice import train
from sparse_updates import channel_masks
from sparse_updates import lite_residual
from sparse_updates import rules as rules_lib
from sparse_updates.rules import TRAIN, Rules

HEAD = r'(.*/)?classifier/.*'
NORM = r'(.*/)?[^/]*norm[^/]*/(scale|bias)'


@dataclasses.dataclass(frozen=True)
class Layer:
  """A kernel-owning module and the norm that follows it.

  Attributes:
    name: the kernel module's path, e.g. 'pw3' or 'backbone/pw3'.
    paths: every parameter path of the layer, in tree order.
  """
  name: str
  paths: tuple[str, ...]

  def leaves(self, leaf: str) -> tuple[str, ...]:
    """The layer's paths that end in '/<leaf>', e.g. leaf='bias'."""
    return tuple(p for p in self.paths if p.rsplit('/', 1)[-1] == leaf)


def forward_order(model, variables: Any, example_x: Any) -> list[str]:
  """Kernel-owning modules in the order the forward pass first uses them.

  Args:
    model: flax module applied as `model.apply(variables, x)`.
    variables: its variables ({'params': ..., ...}) or arrays' shapes.
    example_x: an input batch (only its shape and dtype are used).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(dict(variables))
  names = [[str(getattr(k, 'key', k)) for k in path] for path, _ in leaves]
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x))(
      dict(variables), example_x)
  index = {var: i for i, var in enumerate(closed.jaxpr.invars[:len(leaves)])
           if names[i][0] == 'params' and names[i][-1] == 'kernel'}
  modules = ['/'.join(n[1:-1]) for n in names]
  order: list[str] = []
  # Flax reads parameters in the top-level jaxpr, in call order.
  for eqn in closed.jaxpr.eqns:
    for var in eqn.invars:
      if isinstance(var, jex_core.Literal) or var not in index:
        continue
      if modules[index[var]] not in order:
        order.append(modules[index[var]])
  return order


def model_layers(params: Any, layer_order: Sequence[str] | None = None
                 ) -> list[Layer]:
  """Groups parameter paths into layers, first layer first.

  Args:
    params: parameter tree, in the order `model.init` created it.
    layer_order: kernel-module names in forward order, e.g. from
      `forward_order`; required when the tree's order was lost (jit outputs
      and jax.tree.map return dicts with sorted keys).
  """
  flat = list(train.flatten_params(params))
  modules: dict[str, list[str]] = {}
  for path in flat:
    modules.setdefault(path.rsplit('/', 1)[0] if '/' in path else '',
                       []).append(path)
  kernel_modules = [m for m, ps in modules.items()
                    if any(p.endswith('/kernel') for p in ps)]
  if not kernel_modules:
    raise ValueError('The parameters have no "kernel" leaf, so they cannot be '
                     f'grouped into layers; paths are {list(modules)}.')
  if layer_order is None:
    # flax creates 'kernel' before 'bias'; sorted keys mean jit or tree_map
    # rebuilt the tree, and the forward order of its layers is gone.
    if len(kernel_modules) > 1 and flat == sorted(flat):
      raise ValueError(
          'The parameter tree has sorted keys (as jit and jax.tree.map return '
          'it), so its layer order is lost; pass layer_order='
          'presets.forward_order(model, variables, x).')
  elif sorted(layer_order) != sorted(kernel_modules):
    raise ValueError(f'layer_order={list(layer_order)} must list each '
                     f'kernel module once: {kernel_modules}.')
  groups: dict[str, list[str]] = {m: [] for m in kernel_modules}
  current, pending = None, []
  for module, paths in modules.items():
    if module in groups:
      current = module
      groups[module].extend(pending + paths)
      pending = []
    elif current is None:
      pending.extend(paths)  # A norm before any kernel joins the first layer.
    else:
      groups[current].extend(paths)
  order = list(layer_order) if layer_order is not None else kernel_modules
  return [Layer(name=m, paths=tuple(groups[m])) for m in order]


def exact_rules(paths: Sequence[str], value) -> list[tuple[str, Any]]:
  """One rule per path, matching that path only."""
  return [(re.escape(p), value) for p in paths]


def full_rules() -> Rules:
  return [('.*', TRAIN)]


def bias_only_rules(head: bool = True) -> Rules:
  return ([(HEAD, TRAIN)] if head else []) + [('.*/bias', TRAIN), ('.*', None)]


def norm_only_rules(head: bool = True) -> Rules:
  return ([(HEAD, TRAIN)] if head else []) + [(NORM, TRAIN), ('.*', None)]


def classifier_only_rules() -> Rules:
  return [(HEAD, TRAIN), ('.*', None)]


def last_k_rules(params: Any, k: int = 2,
                 layer_order: Sequence[str] | None = None) -> Rules:
  """Every leaf of the last `k` layers trains (k=1: the classifier)."""
  layers = model_layers(params, layer_order)
  if not isinstance(k, int) or not 1 <= k <= len(layers):
    raise ValueError(f'last_k needs 1 <= k <= {len(layers)} (the number of '
                     f'layers: {[l.name for l in layers]}); got k={k!r}.')
  paths = [p for layer in layers[-k:] for p in layer.paths]
  return exact_rules(paths, TRAIN) + [('.*', None)]


def sparse_channel_rules(fraction: float = 0.25, head: bool = True,
                         bias: bool = True) -> Rules:
  """A `fraction` of every kernel's output channels, plus biases and head."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction must lie in (0, 1]; got {fraction}.')
  return (([(HEAD, TRAIN)] if head else []) +
          ([('.*/bias', TRAIN)] if bias else []) +
          [('.*/kernel', float(fraction)), ('.*', None)])


def tte_rules(params: Any, bias_k: int = 4,
              weight_layers: Sequence[str] = (),
              weight_fraction: float | Mapping[str, float] = 1.0,
              head: bool = True,
              layer_order: Sequence[str] | None = None) -> Rules:
  """Lin et al. (2022)'s sparse update.

  Args:
    params: parameter tree (for the layer order and names).
    bias_k: the biases (conv and norm) of the last `bias_k` layers train;
      0 trains none.
    weight_layers: names of the layers whose kernels train, e.g. ('pw4',).
    weight_fraction: fraction of those kernels' output channels that trains,
      one float for all or {layer name: fraction}.
    head: the classifier trains in full.
    layer_order: see `model_layers`.
  """
  layers = model_layers(params, layer_order)
  names = [l.name for l in layers]
  if not isinstance(bias_k, int) or not 0 <= bias_k <= len(layers):
    raise ValueError(f'bias_k must lie in [0, {len(layers)}]; got {bias_k!r}.')
  unknown = sorted(set(weight_layers) - set(names))
  if unknown:
    raise ValueError(f'weight_layers {unknown} are not layers of the model; '
                     f'valid names are {names}.')
  if isinstance(weight_fraction, Mapping):
    missing = sorted(set(weight_layers) - set(weight_fraction))
    if missing:
      raise ValueError(f'weight_fraction has no entry for {missing}.')
    fractions = {n: float(weight_fraction[n]) for n in weight_layers}
  else:
    fractions = {n: float(weight_fraction) for n in weight_layers}
  rules = [(HEAD, TRAIN)] if head else []
  by_name = {l.name: l for l in layers}
  for name, fraction in fractions.items():
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f'weight_fraction for {name!r} must lie in (0, 1]; '
                       f'got {fraction}.')
    rules += exact_rules(by_name[name].leaves('kernel'),
                         TRAIN if fraction == 1.0 else fraction)
  if bias_k:
    biases = [p for layer in layers[-bias_k:] for p in layer.leaves('bias')]
    rules += exact_rules(biases, TRAIN)
  return rules + [('.*', None)]


# name -> (builder, needs params)
_PRESETS: dict[str, tuple[Callable[..., Rules], bool]] = {
    'full': (full_rules, False),
    'bias_only': (bias_only_rules, False),
    'norm_only': (norm_only_rules, False),
    'classifier_only': (classifier_only_rules, False),
    'last_k': (last_k_rules, True),
    'sparse_channels': (sparse_channel_rules, False),
    'tte': (tte_rules, True),
    'lite_residual': (lite_residual.lite_residual_rules, False),
}
PRESETS = tuple(_PRESETS)
# name -> rule builder, for `ondevice.options.named(PRESET_BUILDERS, ...)`.
PRESET_BUILDERS = {name: builder for name, (builder, _) in _PRESETS.items()}


def get_rules(name: str, params: Any = None, **kwargs) -> Rules:
  """Rules of the preset `name`, e.g. get_rules('last_k', params, k=3).

  Raises:
    ValueError: unknown preset or keyword, or missing params for a preset
      that needs the model's layers.
  """
  if name not in _PRESETS:
    raise ValueError(f'Unknown update scheme {name!r}; valid names are '
                     f'{PRESETS}.')
  builder, needs_params = _PRESETS[name]
  accepted = [p for p in inspect.signature(builder).parameters
              if p != 'params']
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(f'Scheme {name!r} takes no argument(s) {unknown}; it '
                     f'accepts {accepted}.')
  if needs_params:
    if params is None:
      raise ValueError(f'Scheme {name!r} orders layers from the model; call '
                       f'get_rules({name!r}, params, ...).')
    return builder(params, **kwargs)
  return builder(**kwargs)


@dataclasses.dataclass(frozen=True)
class Scheme:
  """What a named preset trains on one model.

  Attributes:
    name: the preset's name.
    paths: sorted trainable leaf paths (for `train.state_from_params`,
      `make_train_step` and federated clients).
    masks: {path: bool output-channel mask} for leaves that train part of
      their channels (wrap the optimiser with `channel_masks.
      masked_optimizer`), or None when every trainable leaf trains fully.
  """
  name: str
  paths: tuple[str, ...]
  masks: dict[str, Any] | None


def resolve(name: str, params: Any, method: str = 'magnitude',
            key: jax.Array | None = None, **kwargs) -> Scheme:
  """The preset `name` applied to `params`: trainable paths and masks.

  Args:
    name: one of PRESETS.
    params: the model's parameters, in `model.init` order (layer-wise
      presets need it; see `model_layers`).
    method, key: how partial-channel presets choose channels (see
      `channel_masks.update_masks`).
    **kwargs: the preset's own arguments, e.g. k=3 for last_k.
  """
  rules = get_rules(name, params, **kwargs)
  if name == 'lite_residual' and not any(
      re.match(rf'(.*/)?{lite_residual.BRANCH_PREFIX}\d+/', p)
      for p in train.flatten_params(params)):
    raise ValueError('The lite_residual preset needs a model with lite '
                     'residual branches (lite_residual.LiteResidualModel); '
                     'this one has none, so it would train biases only.')
  masks = None
  if rules_lib.channel_fractions(params, rules):
    masks = channel_masks.update_masks(params, rules, method=method, key=key)
  return Scheme(name=name, paths=rules_lib.trainable_paths(params, rules),
                masks=masks)
