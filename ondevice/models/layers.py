"""Pieces every model shares: the normalisation choice and its validation.

Normalisation options follow the layers the on-device literature compares:
batch norm (Ioffe & Szegedy, 2015), layer norm (Ba et al., 2016) and group
norm (Wu & He, 2018), the last being the usual choice for federated learning
because it keeps no statistics across clients (Hsieh et al., 2020, "The
Non-IID Data Quagmire of Decentralized Machine Learning").

Quantisation hooks: every model module carries the fields in `QUANT_HOOKS`
(`dot_general`, `conv_general_dilated` and their module-class forms
`dot_general_cls`, `conv_general_dilated_cls`; None means lax's) and hands
them to every `nn.Dense` / `nn.Conv` it creates, as AQT does, so an int8
fake-quantised product can be injected without touching the model body, and
`quantized_training.get_quant(name).model_kwargs()` builds any model.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ('batch', 'layer', 'group', 'none')

# Short on-device runs see few batches, so the running averages must move
# faster than flax's default of 0.99 to be usable at evaluation time.
BATCH_NORM_MOMENTUM = 0.9
# Wu & He (2018) use 32 groups; channel counts that 32 does not divide fall
# back to their largest divisor below it.
GROUP_NORM_GROUPS = 32

DotGeneral = Optional[Callable[..., jax.Array]]
# A no-argument flax Module class used instead of `dot_general` when the
# product needs flax RNG streams (int8 stochastic rounding draws 'quant').
ModuleClass = Any
ConvGeneralDilated = Optional[Callable[..., jax.Array]]
# The keyword arguments every model (and `build_model`) accepts.
QUANT_HOOKS = ('dot_general', 'conv_general_dilated', 'dot_general_cls',
               'conv_general_dilated_cls')


def validate_norm(norm: str) -> None:
  """Raises a ValueError naming the valid choices when `norm` is unknown."""
  if norm not in NORMS:
    raise ValueError(
        f'Unknown norm {norm!r}; pass norm= one of {NORMS} (use "group" or '
        '"none" for federated training, where batch statistics cannot be '
        'shared across clients).')


def validate_positive(name: str, values: Any) -> None:
  """Raises a ValueError when an int or a sequence of ints is not positive."""
  items = values if isinstance(values, (tuple, list)) else (values,)
  for value in items:
    if not isinstance(value, int) or value <= 0:
      raise ValueError(
          f'{name} must be positive integers, got {values!r}; pass e.g. '
          f'{name}=64 or {name}=(32, 64).')


def group_count(channels: int, target: int = GROUP_NORM_GROUPS) -> int:
  """Largest number of groups <= `target` that divides `channels`."""
  for groups in range(min(target, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def apply_norm(x: jax.Array, norm: str, name: str, train: bool,
               mask: Optional[jax.Array] = None) -> jax.Array:
  """Normalises `x` with the layer `norm` selects, inside a compact method.

  For feature maps [..., H, W, C] layer norm reduces over H, W and C (Ba et
  al.'s convolutional form) while keeping one scale and bias per channel, so
  the parameter tree has the same shapes whatever the norm.

  Args:
    x: activations, channels last.
    norm: one of NORMS.
    name: the submodule name, stable across norms (e.g. 'pw3_norm').
    train: batch norm uses batch statistics and updates 'batch_stats' when
      True, and the running averages when False.
    mask: optional [batch] example mask; padded examples (0) are left out of
      the batch statistics, so padding a batch changes nothing.

  Returns:
    The normalised activations (x itself for 'none').
  """
  validate_norm(norm)
  if norm == 'batch':
    bn_mask = None
    if mask is not None and train:
      bn_mask = jnp.broadcast_to(
          mask.reshape(mask.shape + (1,) * (x.ndim - 1)) > 0, x.shape)
    return nn.BatchNorm(
        use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
        name=name)(x, mask=bn_mask)
  if norm == 'layer':
    axes = (-3, -2, -1) if x.ndim >= 4 else (-1,)
    return nn.LayerNorm(reduction_axes=axes, feature_axes=-1, name=name)(x)
  if norm == 'group':
    return nn.GroupNorm(num_groups=group_count(x.shape[-1]), name=name)(x)
  return x


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Scales `x` to unit L2 norm along `axis`; zero vectors stay finite."""
  sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pads(padding, in_sizes, kernel, strides) -> tuple[tuple[int, int], ...]:
  """lax-style padding (a string or (low, high) pairs) as explicit pairs."""
  if isinstance(padding, str):
    if padding == 'SAME':
      return tuple(_same_padding(n, k, s)
                   for n, k, s in zip(in_sizes, kernel, strides))
    if padding == 'VALID':
      return tuple((0, 0) for _ in in_sizes)
    raise ValueError(f'Unsupported padding {padding!r}.')
  return tuple(tuple(p) for p in padding)


def _is_nhwc_hwio(dimension_numbers, lhs_shape, rhs_shape) -> bool:
  # Flax passes a ConvDimensionNumbers of axis indices, lax users strings.
  if dimension_numbers is None:
    return False
  want = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                        ('NHWC', 'HWIO', 'NHWC'))
  got = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                       dimension_numbers)
  return tuple(got) == tuple(want)


def depthwise_conv_general_dilated(lhs, rhs, window_strides, padding,
                                   lhs_dilation=None, rhs_dilation=None,
                                   dimension_numbers=None,
                                   feature_group_count=1, **kwargs):
  """A depthwise conv as a sum of shifted products; lax's signature.

  XLA's CPU backend lowers grouped convolutions with one group per channel
  to a slow generic loop: on a DS-CNN feature map (64x49x20x64, 3x3) we
  measured 0.5 s forward and 5.6 s for the gradient, against 0.04 s and
  0.7 s for this form, which is k*k shifted multiply-adds of NHWC maps and
  differentiates into the same. Falls back to lax for anything that is not
  a plain depthwise NHWC/HWIO convolution with one filter per channel.
  """
  plain = (
      feature_group_count == lhs.shape[-1] == rhs.shape[-1] and
      rhs.shape[-2] == 1 and lhs.ndim == 4 and
      _is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape) and
      all(d == 1 for d in (lhs_dilation or (1, 1))) and
      all(d == 1 for d in (rhs_dilation or (1, 1))))
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, **kwargs)
  kh, kw = rhs.shape[0], rhs.shape[1]
  sh, sw = window_strides
  height, width = lhs.shape[1], lhs.shape[2]
  pads = _pads(padding, (height, width), (kh, kw), (sh, sw))
  x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      patch = jax.lax.slice(
          x, (0, i, j, 0),
          (x.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
           x.shape[3]), (1, sh, sw, 1))
      term = patch * rhs[i, j, 0].astype(patch.dtype)
      out = term if out is None else out + term
  return out


def im2col_patches(x: jax.Array, kernel: tuple[int, int],
                   strides: tuple[int, int], padding) -> jax.Array:
  """[N, H, W, C] -> [N, H', W', kh*kw*C] patches, by slicing.

  Feature order is (row, column, channel), so `patches @ w.reshape(-1, O)`
  is the convolution with an HWIO kernel `w`. Built from kh*kw strided
  slices of the padded input (not `lax.conv_general_dilated_patches`, which
  is itself a convolution): its transpose, the input gradient, is then pads
  and adds instead of an XLA:CPU transposed convolution, which measured
  6-15x slower on 3x3 convs of small batches (benchmarks in the commit log).
  """
  kh, kw = kernel
  sh, sw = strides
  pads = _pads(padding, x.shape[1:3], kernel, strides)
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  cols = [jax.lax.slice(
      x, (0, i, j, 0),
      (x.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
       x.shape[3]), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def im2col_conv_general_dilated(lhs, rhs, window_strides, padding,
                                lhs_dilation=None, rhs_dilation=None,
                                dimension_numbers=None,
                                feature_group_count=1, **kwargs):
  """A dense NHWC/HWIO conv as patches @ kernel; lax's signature.

  The weight gradient then is one matmul (patches^T @ dy), where XLA's CPU
  conv weight-gradient measured 6x slower on the DS-CNN's first layer
  (10x4 kernel, one input channel, batch 64), and the input gradient is a
  matmul followed by the pads and adds of `im2col_patches`' transpose.
  Falls back to lax for dilated or grouped convs and other layouts.
  """
  plain = (
      feature_group_count == 1 and lhs.ndim == 4 and
      _is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape) and
      all(d == 1 for d in (lhs_dilation or (1, 1))) and
      all(d == 1 for d in (rhs_dilation or (1, 1))))
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, **kwargs)
  kh, kw, cin, cout = rhs.shape
  patches = im2col_patches(lhs, (kh, kw), tuple(window_strides), padding)
  kernel = rhs.reshape(kh * kw * cin, cout)
  out = jnp.dot(patches.reshape(-1, patches.shape[-1]),
                kernel.astype(patches.dtype))
  return out.reshape(patches.shape[:-1] + (cout,))


def cpu_friendly_conv_general_dilated(lhs, rhs, window_strides, padding,
                                      **kwargs):
  """Depthwise convs as shifted sums, the rest as im2col matmuls."""
  if kwargs.get('feature_group_count', 1) > 1:
    return depthwise_conv_general_dilated(lhs, rhs, window_strides, padding,
                                          **kwargs)
  return im2col_conv_general_dilated(lhs, rhs, window_strides, padding,
                                     **kwargs)


def windowed_max(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """Max over non-overlapping windows: `lax.reduce_window` max with stride
  equal to the window and VALID padding (e.g. `nn.max_pool(x, (2, 2),
  (2, 2))` is `windowed_max(x, (1, 2, 2, 1))`).

  XLA:CPU runs that reduce-window's gradient (a select-and-scatter, which
  it lowers to a variadic reduce-window over index iotas and a scatter)
  about 8x slower than this form on [8, 28, 28, 32] (1.27 ms against
  0.16 ms for forward and backward), and it was the largest op of a stock
  CNN's training step. Here each window becomes one trailing axis; the
  output is the window's first maximum picked by a one-hot select (summed
  with -0.0, which leaves every value as it is), so the gradient goes to
  that first maximum, as XLA's select-and-scatter sends it: values and
  gradients are equal bit for bit, ties included. Plain JAX ops, so it
  vmaps and differentiates to any order and in forward mode.
  """
  window = tuple(int(w) for w in window)
  if len(window) != x.ndim or min(window) < 1:
    raise ValueError(f'windowed_max: window {window} must give a size >= 1 '
                     f'for each of the {x.ndim} axes of x {x.shape}.')
  out_shape = tuple(d // w for d, w in zip(x.shape, window))
  # VALID windows: trailing elements that fill no whole window drop out.
  x = x[tuple(slice(0, o * w) for o, w in zip(out_shape, window))]
  x = x.reshape(tuple(s for o, w in zip(out_shape, window) for s in (o, w)))
  n = len(window)
  x = x.transpose(tuple(range(0, 2 * n, 2)) + tuple(range(1, 2 * n, 2)))
  x = x.reshape(out_shape + (-1,))
  first = jax.lax.stop_gradient(jnp.argmax(x, axis=-1))
  pick = first[..., None] == jnp.arange(x.shape[-1])
  return jnp.sum(jnp.where(pick, x, jnp.array(-0.0, x.dtype)),
                 axis=-1).astype(x.dtype)
