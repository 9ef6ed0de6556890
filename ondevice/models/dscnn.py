"""Depthwise-separable CNN for keyword spotting.

Zhang, Suda, Lai & Chandra (2017), "Hello Edge: Keyword Spotting on
Microcontrollers", arXiv:1711.07128, Table 7 (DS-CNN S / M / L), as in ARM's
ML-KWS-for-MCU reference code: one regular convolution, then blocks of a 3x3
depthwise convolution and a 1x1 pointwise convolution (computed as a Dense
layer over pixels, kernel [C, C]), each followed by a
norm and a ReLU, global average pooling and one Dense classifier. Padding is
'SAME' throughout.

Parameter paths are stable and regex-friendly:
  conv0/{kernel,bias}, conv0_norm/{scale,bias},
  dw{i}/..., dw{i}_norm/..., pw{i}/..., pw{i}_norm/...   (i = 1..num_blocks)
  classifier/{kernel,bias}

Parameter count with batch, layer or group norm, C channels, B blocks,
K classes and a kh x kw first kernel (every norm has 2C params):
  conv0:      kh*kw*C + C + 2C
  each block: (9C + C + 2C) + (C*C + C + 2C)
  classifier: C*K + K
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ondevice.models import layers

# (channels, first kernel, first stride, strides of the depthwise convs), from
# Table 7 of Zhang et al. (2017) and ARM's `model_size_info` for each size.
DSCNN_PRESETS = {
    'ds_cnn_s': dict(channels=64, first_kernel=(10, 4), first_stride=(2, 2),
                     block_strides=((1, 1),) * 4),
    'ds_cnn_m': dict(channels=172, first_kernel=(10, 4), first_stride=(2, 1),
                     block_strides=((2, 2),) + ((1, 1),) * 3),
    'ds_cnn_l': dict(channels=276, first_kernel=(10, 4), first_stride=(2, 1),
                     block_strides=((2, 2),) + ((1, 1),) * 4),
}


class DSCNN(nn.Module):
  """Depthwise-separable CNN over log-mel features [B, T, F] (or [B, T, F, 1]).

  Attributes:
    num_classes: number of logits.
    channels: width of every convolution (64 for S, 276 for L).
    first_kernel: (time, frequency) size of the first, regular convolution.
    first_stride: its stride.
    block_strides: one (time, frequency) stride per depthwise-separable block;
      its length is the number of blocks.
    norm: 'batch', 'layer', 'group' or 'none'.
    conv_bias: give convolutions a bias even when a norm follows; on by
      default so bias-only training has a bias in every layer.
    dot_general: replaces lax.dot_general in the classifier (None: lax's).
    conv_general_dilated: replaces lax.conv_general_dilated in every
      convolution (None: lax's).
  """
  num_classes: int
  channels: int = 64
  first_kernel: Tuple[int, int] = (10, 4)
  first_stride: Tuple[int, int] = (2, 2)
  block_strides: Sequence[Tuple[int, int]] = ((1, 1),) * 4
  norm: str = 'batch'
  conv_bias: bool = True
  dot_general: layers.DotGeneral = None
  conv_general_dilated: layers.ConvGeneralDilated = None
  dot_general_cls: layers.ModuleClass = None
  conv_general_dilated_cls: layers.ModuleClass = None
  # The train step passes the example mask so batch norm ignores padding.
  accepts_mask = True

  def __post_init__(self):
    layers.validate_positive('num_classes', self.num_classes)
    layers.validate_positive('channels', self.channels)
    layers.validate_norm(self.norm)
    if not self.block_strides:
      raise ValueError('block_strides is empty; pass one (time, freq) stride '
                       'per depthwise-separable block, e.g. ((1, 1),) * 4.')
    super().__post_init__()

  def _conv(self, features, kernel, stride, name, groups=1):
    conv = self.conv_general_dilated
    if conv is None and self.conv_general_dilated_cls is None:
      # XLA's CPU conv gradients are slow; see layers for measurements.
      conv = layers.cpu_friendly_conv_general_dilated
    return nn.Conv(
        features, kernel_size=tuple(kernel), strides=tuple(stride),
        padding='SAME', feature_group_count=groups, use_bias=self.conv_bias,
        conv_general_dilated=conv,
        conv_general_dilated_cls=self.conv_general_dilated_cls, name=name)

  def _pointwise(self, features, name, x):
    # A 1x1 convolution is a matmul over pixels. Written as one, its gradient
    # is ~14x faster on XLA's CPU backend than the 1x1 conv's (measured on a
    # 64x49x20x64 map), and int8 quantisation reaches it via `dot_general`.
    flat = x.reshape(-1, x.shape[-1])
    y = nn.Dense(features, use_bias=self.conv_bias,
                 dot_general=self.dot_general,
                 dot_general_cls=self.dot_general_cls, name=name)(flat)
    return y.reshape(x.shape[:-1] + (features,))

  @nn.compact
  def _forward(self, x: jax.Array, train: bool, with_head: bool,
               mask=None) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(
          f'DSCNN expects log-mel features [batch, time, freq] or [batch, '
          f'time, freq, 1], got shape {x.shape}; vmap over any extra leading '
          'axis (e.g. clients) instead of passing it in.')
    c = self.channels
    x = self._conv(c, self.first_kernel, self.first_stride, 'conv0')(x)
    x = nn.relu(layers.apply_norm(x, self.norm, 'conv0_norm', train, mask))
    for i, stride in enumerate(self.block_strides, start=1):
      x = self._conv(c, (3, 3), stride, f'dw{i}', groups=c)(x)
      x = nn.relu(layers.apply_norm(x, self.norm, f'dw{i}_norm', train, mask))
      x = self._pointwise(c, f'pw{i}', x)
      x = nn.relu(layers.apply_norm(x, self.norm, f'pw{i}_norm', train, mask))
    x = jnp.mean(x, axis=(1, 2))
    if not with_head:
      return x
    return nn.Dense(self.num_classes, dot_general=self.dot_general,
                    dot_general_cls=self.dot_general_cls,
                    name='classifier')(x)

  def features(self, x: jax.Array, train: bool = False,
               mask=None) -> jax.Array:
    """Globally pooled embedding [B, channels] (the classifier's input)."""
    return self._forward(x, train, with_head=False, mask=mask)

  def __call__(self, x: jax.Array, train: bool = False,
               mask=None) -> jax.Array:
    """Logits [B, num_classes]."""
    return self._forward(x, train, with_head=True, mask=mask)
