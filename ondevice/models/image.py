"""Small image classifiers: a LeNet-style CNN and an MLP.

SmallCNN follows the "CNN" of McMahan et al. (2017), "Communication-Efficient
Learning of Deep Networks from Decentralized Data" (two 3x3 conv layers of 32
and 64 channels, each followed by 2x2 max pooling, a hidden Dense layer, a
classifier), the usual federated baseline on (Fashion-)MNIST; its widths are
fields so the same module covers the parameter budgets a benchmark sweeps.

Parameter counts for 28x28x1 inputs, K classes, norm='none':
  SmallCNN, channels (c1, c2), hidden (h,):
    conv1: 9*c1 + c1; conv2: 9*c1*c2 + c2
    pool='flatten': hidden: 7*7*c2*h + h   (pool='avg': c2*h + h)
    classifier: h*K + K   (no hidden layer: c2*K + K, or 49*c2*K + K)
  MLP, hidden (h1, ..., hn): 784*h1 + h1 + ... + hn*K + K
    (one hidden layer of h units: 795h + 10 for K = 10).
Each norm other than 'none' adds 2 params per channel / unit it normalises.
`ondevice.models.build_model` names presets that land near 2k, 20k and 200k.

Parameter paths: conv{i}, conv{i}_norm, hidden{i}, hidden{i}_norm,
classifier (i from 1).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ondevice.models import layers

POOLS = ('flatten', 'avg')


class SmallCNN(nn.Module):
  """3x3 conv + max-pool stages, then Dense layers, for [B, H, W, C] images.

  Attributes:
    num_classes: number of logits.
    channels: output channels of each conv stage (each stage halves H, W).
    hidden: sizes of the Dense layers between the convs and the classifier.
    pool: 'flatten' keeps every position (McMahan et al.); 'avg' averages
      them globally, which makes the model far smaller.
    norm: 'batch', 'layer', 'group' or 'none', after every conv and hidden
      Dense layer.
    dot_general: replaces lax.dot_general in every Dense (None: lax's).
    conv_general_dilated: replaces lax.conv_general_dilated in every conv.
  """
  num_classes: int
  channels: Sequence[int] = (32, 64)
  hidden: Sequence[int] = (128,)
  pool: str = 'flatten'
  norm: str = 'none'
  dot_general: layers.DotGeneral = None
  conv_general_dilated: layers.ConvGeneralDilated = None
  dot_general_cls: layers.ModuleClass = None
  conv_general_dilated_cls: layers.ModuleClass = None
  # The train step passes the example mask so batch norm ignores padding.
  accepts_mask = True

  def __post_init__(self):
    layers.validate_positive('num_classes', self.num_classes)
    layers.validate_positive('channels', tuple(self.channels))
    layers.validate_positive('hidden', tuple(self.hidden))
    layers.validate_norm(self.norm)
    if not self.channels:
      raise ValueError('channels is empty; pass at least one conv width, '
                       'e.g. channels=(32, 64), or use the "mlp" model.')
    if self.pool not in POOLS:
      raise ValueError(f'Unknown pool {self.pool!r}; pass pool= one of '
                       f'{POOLS}.')
    super().__post_init__()

  @nn.compact
  def _forward(self, x: jax.Array, train: bool, with_head: bool,
               mask=None) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(
          f'SmallCNN expects images [batch, height, width(, channels)], got '
          f'shape {x.shape}; vmap over any extra leading axis instead.')
    for i, width in enumerate(self.channels, start=1):
      x = nn.Conv(width, kernel_size=(3, 3), padding='SAME',
                  conv_general_dilated=(
                      self.conv_general_dilated or
                      (None if self.conv_general_dilated_cls else
                       layers.cpu_friendly_conv_general_dilated)),
        conv_general_dilated_cls=self.conv_general_dilated_cls,
                  name=f'conv{i}')(x)
      x = nn.relu(layers.apply_norm(x, self.norm, f'conv{i}_norm', train, mask))
      # nn.max_pool(x, (2, 2), (2, 2)), bit for bit, with a CPU-fast grad.
      x = layers.windowed_max(x, (1, 2, 2, 1))
    if self.pool == 'avg':
      x = jnp.mean(x, axis=(1, 2))
    else:
      x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden, start=1):
      x = nn.Dense(width, dot_general=self.dot_general,
                    dot_general_cls=self.dot_general_cls, name=f'hidden{i}')(x)
      x = nn.relu(layers.apply_norm(x, self.norm, f'hidden{i}_norm', train, mask))
    if not with_head:
      return x
    return nn.Dense(self.num_classes, dot_general=self.dot_general,
                    dot_general_cls=self.dot_general_cls,
                    name='classifier')(x)

  def features(self, x: jax.Array, train: bool = False,
               mask=None) -> jax.Array:
    """The classifier's input: last hidden layer, or the pooled conv map."""
    return self._forward(x, train, with_head=False, mask=mask)

  def __call__(self, x: jax.Array, train: bool = False,
               mask=None) -> jax.Array:
    """Logits [B, num_classes]."""
    return self._forward(x, train, with_head=True, mask=mask)


class MLP(nn.Module):
  """Flattens every non-batch axis, then ReLU Dense layers and a classifier.

  Attributes:
    num_classes: number of logits.
    hidden: sizes of the hidden layers (may be empty: logistic regression).
    norm: 'batch', 'layer', 'group' or 'none', after every hidden layer.
    dot_general: replaces lax.dot_general in every Dense (None: lax's).
    conv_general_dilated: unused (no convolutions); accepted so every model
      is built the same way.
  """
  num_classes: int
  hidden: Sequence[int] = (128,)
  norm: str = 'none'
  dot_general: layers.DotGeneral = None
  conv_general_dilated: layers.ConvGeneralDilated = None
  dot_general_cls: layers.ModuleClass = None
  conv_general_dilated_cls: layers.ModuleClass = None
  # The train step passes the example mask so batch norm ignores padding.
  accepts_mask = True

  def __post_init__(self):
    layers.validate_positive('num_classes', self.num_classes)
    layers.validate_positive('hidden', tuple(self.hidden))
    layers.validate_norm(self.norm)
    super().__post_init__()

  @nn.compact
  def _forward(self, x: jax.Array, train: bool, with_head: bool,
               mask=None) -> jax.Array:
    if x.ndim < 2:
      raise ValueError(f'MLP expects [batch, ...] inputs, got shape {x.shape};'
                       ' add a batch axis with x[None].')
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden, start=1):
      x = nn.Dense(width, dot_general=self.dot_general,
                    dot_general_cls=self.dot_general_cls, name=f'hidden{i}')(x)
      x = nn.relu(layers.apply_norm(x, self.norm, f'hidden{i}_norm', train, mask))
    if not with_head:
      return x
    return nn.Dense(self.num_classes, dot_general=self.dot_general,
                    dot_general_cls=self.dot_general_cls,
                    name='classifier')(x)

  def features(self, x: jax.Array, train: bool = False,
               mask=None) -> jax.Array:
    """The last hidden layer's activations (the flattened input if none)."""
    return self._forward(x, train, with_head=False, mask=mask)

  def __call__(self, x: jax.Array, train: bool = False,
               mask=None) -> jax.Array:
    """Logits [B, num_classes]."""
    return self._forward(x, train, with_head=True, mask=mask)
