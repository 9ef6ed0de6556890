"""Pieces every model shares: the normalisation choice and its validation.

Normalisation options follow the layers the on-device literature compares:
batch norm (Ioffe & Szegedy, 2015), layer norm (Ba et al., 2016) and group
norm (Wu & He, 2018), the last being the usual choice for federated learning
because it keeps no statistics across clients (Hsieh et al., 2020, "The
Non-IID Data Quagmire of Decentralized Machine Learning").

Quantisation hooks: every model module carries `dot_general` and
`conv_general_dilated` fields (None means lax's) and hands them to every
`nn.Dense` / `nn.Conv` it creates, as AQT does, so an int8 fake-quantised
product can be injected without touching the model body.
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
