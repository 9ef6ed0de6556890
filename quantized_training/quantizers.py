"""Symmetric int quantisers, stochastic rounding, straight-through estimator.

A tensor ``x`` is quantised to ``q = round(x / s)`` clipped to
``[-qmax, qmax]`` with ``qmax = 2**(bits - 1) - 1`` (symmetric, zero exactly
representable, as in Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference"). The scale ``s`` is
the absolute maximum over the *reduced* axes divided by ``qmax``: reducing over
a weight's input axes gives per-output-channel scales, reducing over an
activation's feature axes gives per-row (per-example) scales, reducing over all
axes gives one per-tensor scale. ``clip_ratio < 1`` shrinks the range so that
outliers saturate.

Stochastic rounding (Gupta et al. 2015, "Deep Learning with Limited Numerical
Precision") rounds ``v`` up with probability ``frac(v)``, so ``E[q] = v``; it
takes an explicit PRNG key. The dither has ``noise_bits`` (16 by default) bits
of resolution, which keeps the rounding bias below ``2**-(noise_bits + 1)`` of
one quantisation step; by default it comes from a counter-based integer hash
seeded by the key, which XLA fuses into the quantiser (``impl='threefry'``
draws ``jax.random.bits`` instead).

``fake_quant`` is the straight-through estimator (Bengio et al. 2013) written as
an explicit ``jax.custom_vjp``: the forward pass returns ``dequant(quant(x))``
and the backward pass passes the cotangent through unchanged, optionally zeroed
where ``x`` lies outside the clipping range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

Axes = Sequence[int] | None

_NOISE_BITS = (8, 16)  # float32 holds (k + 0.5) / 2**b exactly below 1.


def qmax(bits: int) -> int:
  """Largest magnitude of a symmetric ``bits``-bit integer code."""
  check_bits(bits)
  return 2 ** (bits - 1) - 1


def check_bits(bits: int) -> None:
  """Raises a ValueError unless ``bits`` is a supported integer width."""
  if not isinstance(bits, int) or not 2 <= bits <= 16:
    raise ValueError(
        f'bits must be an int in [2, 16], got {bits!r}; use 8 for int8 or '
        'None in a layer config to keep that matmul in float.')


def storage_dtype(bits: int) -> jnp.dtype:
  """The narrowest signed integer dtype that holds ``bits``-bit codes."""
  return jnp.dtype(jnp.int8) if bits <= 8 else jnp.dtype(jnp.int16)


def _normalise_axes(reduce_axes: Axes, ndim: int) -> tuple[int, ...]:
  if reduce_axes is None:
    return tuple(range(ndim))
  axes = tuple(sorted(a % ndim for a in reduce_axes)) if ndim else ()
  if len(set(axes)) != len(axes):
    raise ValueError(f'reduce_axes {reduce_axes} repeat an axis.')
  return axes


def absmax_scale(x: jax.Array, reduce_axes: Axes, bits: int,
                 clip_ratio: float = 1.0) -> jax.Array:
  """Per-slice quantisation scale ``clip_ratio * max|x| / qmax``.

  Args:
    x: the float tensor to calibrate.
    reduce_axes: axes that share one scale (kept with size 1 in the result);
      None shares one scale over the whole tensor.
    bits: integer width.
    clip_ratio: fraction of the absolute maximum mapped to ``qmax``.

  Returns:
    float32 scales broadcastable against ``x``; all-zero slices get scale 1 so
    that they quantise to 0 without a division by zero. Gradients do not flow
    through the scale (it is calibration, not a parameter).
  """
  if not 0.0 < clip_ratio <= 1.0:
    raise ValueError(f'clip_ratio must be in (0, 1], got {clip_ratio}.')
  axes = _normalise_axes(reduce_axes, x.ndim)
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
  scale = amax * (clip_ratio / qmax(bits))
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  return jax.lax.stop_gradient(scale)


def _mix32(x: jax.Array) -> jax.Array:
  # A 32-bit avalanche mixer (the "lowbias32" constants of C. Wellons's hash
  # prospector); every input bit flips each output bit with probability ~1/2.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Counter-based uint32 noise: two mixing rounds of the element index.

  The two 32-bit seeds come from ``key`` through Threefry, so the noise is a
  pure function of the key; the per-element work is a handful of integer ops
  that XLA fuses into the consumer, with no extra pass over memory.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + (jax.lax.broadcasted_iota(jnp.uint32, shape, axis) *
                     jnp.uint32(stride % 2**32))
    stride *= shape[axis]
  x = _mix32((index * jnp.uint32(0x9E3779B1)) ^ seeds[0])
  return _mix32(x ^ seeds[1])


def uniform_dither(key: jax.Array, shape: Sequence[int], noise_bits: int = 16,
                   impl: str = 'hash') -> jax.Array:
  """Uniform noise on ``(0, 1)`` for stochastic rounding.

  Args:
    key: PRNG key; the noise is a pure function of it.
    shape: output shape.
    noise_bits: resolution; values are ``(k + 0.5) / 2**noise_bits``.
    impl: 'hash' (default) mixes the element index with two seeds drawn from
      the key (about 4x cheaper than Threefry on CPU, fused into the
      quantiser); 'threefry' draws ``jax.random.bits``, packing
      ``32 // noise_bits`` elements into each 32-bit word.

  Returns:
    float32 noise of ``shape``.
  """
  if noise_bits not in _NOISE_BITS:
    raise ValueError(f'noise_bits must be one of {_NOISE_BITS}, '
                     f'got {noise_bits}.')
  shape = tuple(shape)
  if impl == 'hash':
    codes = _hash_bits(key, shape) >> jnp.uint32(32 - noise_bits)
  elif impl == 'threefry':
    size = math.prod(shape)
    per_word = 32 // noise_bits
    raw = jax.random.bits(key, (-(-size // per_word),), jnp.uint32)
    if per_word > 1:
      mask = jnp.uint32(2**noise_bits - 1)
      planes = [(raw >> jnp.uint32(noise_bits * i)) & mask
                for i in range(per_word)]
      raw = jnp.concatenate(planes)[:size]
    codes = raw.reshape(shape)
  else:
    raise ValueError(f"impl must be 'hash' or 'threefry', got {impl!r}.")
  return (codes.astype(jnp.float32) + 0.5) * (2.0**-noise_bits)


def quantize(x: jax.Array, scale: jax.Array, bits: int, *,
             dither: jax.Array | None = None,
             dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Integer codes of ``x / scale``, returned in ``dtype``.

  Args:
    x: float tensor.
    scale: scales broadcastable against ``x`` (see ``absmax_scale``).
    bits: integer width; codes lie in ``[-qmax(bits), qmax(bits)]``.
    dither: None for round-to-nearest(-even); otherwise uniform noise on
      ``(0, 1)`` of ``x``'s shape, giving stochastic rounding
      ``floor(x / scale + dither)``.
    dtype: float32 for the simulated path, an integer dtype for the real
      integer path.

  Returns:
    Integer-valued codes, clipped to the symmetric range.
  """
  bound = qmax(bits)
  v = x.astype(jnp.float32) * (1.0 / scale)
  r = jnp.round(v) if dither is None else jnp.floor(v + dither)
  return jnp.clip(r, -bound, bound).astype(dtype)


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
  """Float values ``q * scale``."""
  return q.astype(jnp.float32) * scale


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """Configuration of a standalone quantiser (for weights, states, deltas).

  Attributes:
    bits: integer width.
    channel_axes: axes that keep their own scale; () is per-tensor. Weights
      usually keep the output-channel axis (-1), activations the example axis
      (0).
    clip_ratio: fraction of the absolute maximum mapped to ``qmax``.
    stochastic: stochastic instead of round-to-nearest rounding (needs a key).
    noise_bits: resolution of the stochastic-rounding dither.
    zero_grad_outside_clip: the straight-through gradient is zeroed where
      ``|x|`` exceeds the clipping range (only matters with ``clip_ratio < 1``).
  """
  bits: int = 8
  channel_axes: tuple[int, ...] = ()
  clip_ratio: float = 1.0
  stochastic: bool = False
  noise_bits: int = 16
  zero_grad_outside_clip: bool = False

  def __post_init__(self):
    check_bits(self.bits)
    if not 0.0 < self.clip_ratio <= 1.0:
      raise ValueError(f'clip_ratio must be in (0, 1], got {self.clip_ratio}.')
    if self.noise_bits not in _NOISE_BITS:
      raise ValueError(f'noise_bits must be one of {_NOISE_BITS}.')

  def reduce_axes(self, ndim: int) -> tuple[int, ...]:
    keep = {a % ndim for a in self.channel_axes} if ndim else set()
    return tuple(a for a in range(ndim) if a not in keep)

  def scale(self, x: jax.Array) -> jax.Array:
    return absmax_scale(x, self.reduce_axes(x.ndim), self.bits,
                        self.clip_ratio)

  def quantize(self, x: jax.Array, key: jax.Array | None = None,
               dtype: jnp.dtype | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns ``(codes, scale)``; codes in the storage dtype by default."""
    scale = self.scale(x)
    dither = None
    if self.stochastic:
      if key is None:
        raise ValueError('Quantizer(stochastic=True) needs key=; pass a '
                         'jax.random.key or set stochastic=False.')
      dither = uniform_dither(key, x.shape, self.noise_bits)
    dtype = storage_dtype(self.bits) if dtype is None else dtype
    return quantize(x, scale, self.bits, dither=dither, dtype=dtype), scale

  def fake_quant(self, x: jax.Array, key: jax.Array | None = None):
    """``dequant(quant(x))`` with a straight-through gradient."""
    return fake_quant(x, key, self)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fake_quant(x: jax.Array, key: jax.Array | None,
               quantizer: Quantizer) -> jax.Array:
  """Straight-through fake quantisation: see the module docstring."""
  q, scale = quantizer.quantize(x, key, dtype=jnp.float32)
  return (q * scale).astype(x.dtype)


def _fake_quant_fwd(x, key, quantizer):
  q, scale = quantizer.quantize(x, key, dtype=jnp.float32)
  inside = None
  if quantizer.zero_grad_outside_clip:
    inside = jnp.abs(x) <= scale * qmax(quantizer.bits)
  return (q * scale).astype(x.dtype), inside


def _fake_quant_bwd(quantizer, inside, g):
  del quantizer  # The estimator does not depend on the grid.
  if inside is not None:
    g = jnp.where(inside, g, jnp.zeros_like(g))
  return g, None


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
