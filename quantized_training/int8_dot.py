"""``int8_dot_general``: a ``lax.dot_general`` drop-in with int8 fwd and bwd.

All three matmuls of a layer (forward, input gradient, weight gradient) are
quantised as configured by ``Int8Config``, inside one ``jax.custom_vjp``:

* forward: ``y = (q_l . q_r) * s_l * s_r`` with scales computed over the
  contracting axes (per row of the activations, per output channel of the
  weights), so they factor out of the sum (Jacob et al. 2018);
* backward: the saved int8 operands are reused and their scales folded into
  the output gradient before it is quantised (the AQT "use_fwd_quant" trick),
  e.g. ``dx = Q(dy * s_r) . q_r^T``; this is the straight-through gradient of
  the quantised forward, with gradient quantisation as in Banner et al. 2018
  ("Scalable Methods for 8-bit Training of Neural Networks") and stochastic
  rounding of the gradient as in Gupta et al. 2015. One dither array is drawn
  per backward pass and shared by the two gradient matmuls (each stays
  unbiased).

``use_int`` selects int8 x int8 -> int32 matmuls (``preferred_element_type``)
instead of float32 matmuls of integer-valued operands; the two agree exactly
while sums stay below 2**24 and otherwise within float32 rounding.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quantized_training import quantizers
from quantized_training.config import BwdConfig, Int8Config

DEFAULT_CONFIG = Int8Config()


class DotDims(NamedTuple):
  """Axis bookkeeping of one dot_general (all tuples of ints)."""
  lc: tuple[int, ...]  # lhs contracting
  rc: tuple[int, ...]
  lb: tuple[int, ...]  # lhs batch
  rb: tuple[int, ...]
  lf: tuple[int, ...]  # lhs free, ascending
  rf: tuple[int, ...]

  @property
  def lax_dims(self):
    return ((self.lc, self.rc), (self.lb, self.rb))


def dot_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> DotDims:
  """Parses lax dimension numbers into hashable ``DotDims``."""
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f'Mismatched dimension_numbers {dimension_numbers}.')
  lf = tuple(a for a in range(lhs_ndim) if a not in lc + lb)
  rf = tuple(a for a in range(rhs_ndim) if a not in rc + rb)
  return DotDims(lc, rc, lb, rb, lf, rf)


def scale_to_out(scale: jax.Array, contract: Sequence[int],
                 batch: Sequence[int], n_other_free: int,
                 is_lhs: bool) -> jax.Array:
  """Lays out an operand's scale (size 1 on ``contract``) like the dot output.

  dot_general orders its output as ``[batch, lhs free, rhs free]``; an lhs
  scale is broadcast over the rhs free axes and vice versa.
  """
  contract, batch = tuple(contract), tuple(batch)
  free = tuple(a for a in range(scale.ndim) if a not in contract + batch)
  s = jnp.transpose(scale, batch + free + contract)
  kept = s.shape[:len(batch) + len(free)]
  if is_lhs:
    return s.reshape(kept + (1,) * n_other_free)
  nb = len(batch)
  return s.reshape(kept[:nb] + (1,) * n_other_free + kept[nb:])


def _perm_back(src: Sequence[int]) -> tuple[int, ...] | None:
  perm = tuple(int(i) for i in np.argsort(src))
  return None if perm == tuple(range(len(perm))) else perm


def _matmul(a, b, dims, use_int: bool, precision):
  """dot_general of codes (int or integer-valued float) into float32."""
  if use_int:
    acc = lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32)
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def code_dtype(use_int: bool, bits: int):
  """Integer storage on the integer path, integer-valued float32 otherwise."""
  return quantizers.storage_dtype(bits) if use_int else jnp.float32


class SavedOperand(NamedTuple):
  """A forward operand as the backward pass sees it (a custom_vjp residual)."""
  values: jax.Array        # codes (int or float) or the float operand
  scale: jax.Array | None  # None when ``values`` is the float operand
  inside: jax.Array | None  # clip mask for the straight-through gradient


def _quantize_fwd_operand(x, contract, per_channel, cfg, bwd: BwdConfig):
  if cfg.bits is None:
    return SavedOperand(x, None, None), x
  scale = quantizers.absmax_scale(x, contract if per_channel else None,
                                  cfg.bits, cfg.clip_ratio)
  codes = quantizers.quantize(x, scale, cfg.bits,
                              dtype=code_dtype(cfg.use_int, cfg.bits))
  inside = None
  if cfg.zero_grad_outside_clip and cfg.clip_ratio < 1.0:
    inside = jnp.abs(x) <= scale * quantizers.qmax(cfg.bits)
  # The backward matmul that reads this operand wants its own code dtype.
  saved_dtype = (code_dtype(bwd.use_int, cfg.bits) if bwd.quantized
                 else jnp.float32)
  return SavedOperand(codes.astype(saved_dtype), scale, inside), codes


def _forward(dims: DotDims, precision, config: Int8Config, lhs, rhs):
  f = config.fwd
  sl, ql = _quantize_fwd_operand(lhs, dims.lc, f.lhs_per_channel, f,
                                 config.drhs)
  sr, qr = _quantize_fwd_operand(rhs, dims.rc, f.rhs_per_channel, f,
                                 config.dlhs)
  if f.bits is None:
    out = _matmul(lhs, rhs, dims.lax_dims, False, precision)
  else:
    out = _matmul(ql, qr, dims.lax_dims, f.use_int, precision)
    out = out * (scale_to_out(sl.scale, dims.lc, dims.lb, len(dims.rf), True)
                 * scale_to_out(sr.scale, dims.rc, dims.rb, len(dims.lf),
                                False))
  return out, sl, sr


def _grad_matmul(g, g_contract, g_batch, saved: SavedOperand, saved_contract,
                 saved_batch, grad_first: bool, cfg: BwdConfig, dither,
                 precision):
  """One backward matmul ``g . saved`` (or ``saved . g``) as configured.

  ``g`` already carries the saved operand's scale, so ``saved.values`` enter
  as plain codes.
  """
  if grad_first:
    dims = ((g_contract, saved_contract), (g_batch, saved_batch))
  else:
    dims = ((saved_contract, g_contract), (saved_batch, g_batch))

  def order(x, y):
    return (x, y) if grad_first else (y, x)

  if not cfg.quantized:
    values = saved.values.astype(jnp.float32)
    return _matmul(*order(g, values), dims, False, precision)
  values, extra = saved.values, None
  if saved.scale is None:
    # The forward kept this operand in float: quantise it for this matmul.
    s = quantizers.absmax_scale(values, saved_contract, cfg.bits)
    values = quantizers.quantize(values, s, cfg.bits,
                                 dtype=code_dtype(cfg.use_int, cfg.bits))
    n_g_free = g.ndim - len(g_contract) - len(g_batch)
    extra = scale_to_out(s, saved_contract, saved_batch, n_g_free,
                         not grad_first)
  sg = quantizers.absmax_scale(g, g_contract if cfg.per_channel else None,
                               cfg.bits)
  qg = quantizers.quantize(g, sg, cfg.bits,
                           dither=dither if cfg.stochastic_rounding else None,
                           dtype=code_dtype(cfg.use_int, cfg.bits))
  n_saved_free = values.ndim - len(saved_contract) - len(saved_batch)
  out = _matmul(*order(qg, values), dims, cfg.use_int, precision)
  out = out * scale_to_out(sg, g_contract, g_batch, n_saved_free, grad_first)
  return out if extra is None else out * extra


def _backward(dims: DotDims, precision, config: Int8Config, sl: SavedOperand,
              sr: SavedOperand, key, g):
  g = g.astype(jnp.float32)
  nb, nlf, nrf = len(dims.lb), len(dims.lf), len(dims.rf)
  g_batch = tuple(range(nb))
  g_lfree = tuple(range(nb, nb + nlf))
  g_rfree = tuple(range(nb + nlf, nb + nlf + nrf))
  dither = None
  if config.needs_rng:
    if key is None:
      raise ValueError(
          'This Int8Config rounds gradients stochastically, so the backward '
          'pass needs a PRNG key: pass key= to int8_dot_general, or '
          "rngs={'quant': key} to the flax apply.")
    dither = quantizers.uniform_dither(key, g.shape, config.noise_bits,
                                       config.noise_impl)

  # Input gradient: dy . rhs over the rhs free axes, then back to lhs layout.
  g_l = g
  if sr.scale is not None:
    g_l = g * scale_to_out(sr.scale, dims.rc, dims.rb, nlf, False)
  dlhs = _grad_matmul(g_l, g_rfree, g_batch, sr, dims.rf, dims.rb, True,
                      config.dlhs, dither, precision)
  perm = _perm_back(dims.lb + dims.lf +
                    tuple(dims.lc[i] for i in np.argsort(dims.rc)))
  dlhs = dlhs if perm is None else jnp.transpose(dlhs, perm)

  # Weight gradient: lhs . dy over the lhs free axes; lands in rhs layout.
  g_r = g
  if sl.scale is not None:
    g_r = g * scale_to_out(sl.scale, dims.lc, dims.lb, nrf, True)
  drhs = _grad_matmul(g_r, g_lfree, g_batch, sl, dims.lf, dims.lb, False,
                      config.drhs, dither, precision)
  perm = _perm_back(dims.rb + tuple(dims.rc[i] for i in np.argsort(dims.lc)) +
                    dims.rf)
  drhs = drhs if perm is None else jnp.transpose(drhs, perm)

  if sl.inside is not None:
    dlhs = jnp.where(sl.inside, dlhs, 0.0)
  if sr.inside is not None:
    drhs = jnp.where(sr.inside, drhs, 0.0)
  return dlhs, drhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _int8_dot(dims, precision, config, lhs, rhs, key):
  out, _, _ = _forward(dims, precision, config, lhs, rhs)
  return out


def _int8_dot_fwd(dims, precision, config, lhs, rhs, key):
  out, sl, sr = _forward(dims, precision, config, lhs, rhs)
  return out, (sl, sr, key)


def _int8_dot_bwd(dims, precision, config, res, g):
  sl, sr, key = res
  dlhs, drhs = _backward(dims, precision, config, sl, sr, key, g)
  return dlhs, drhs, None


_int8_dot.defvjp(_int8_dot_fwd, _int8_dot_bwd)


def int8_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                     precision: Any = None,
                     preferred_element_type: Any = None, *,
                     config: Int8Config = DEFAULT_CONFIG,
                     key: jax.Array | None = None) -> jax.Array:
  """``lax.dot_general`` with quantised forward and backward matmuls.

  Args:
    lhs: activations (any float dtype; computed in float32).
    rhs: weights.
    dimension_numbers: as for ``lax.dot_general``.
    precision: forwarded to the float (simulated-path) matmuls.
    preferred_element_type: output dtype (default: the inputs' result type).
    config: which matmuls are quantised and how.
    key: PRNG key for stochastic rounding of gradients; required only when
      ``config.needs_rng`` and a gradient is taken.

  Returns:
    The product, like ``lax.dot_general``.
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if config.is_float:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  dims = dot_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  if isinstance(precision, list):
    precision = tuple(precision)
  out = _int8_dot(dims, precision, config, lhs.astype(jnp.float32),
                  rhs.astype(jnp.float32),
                  key if config.needs_rng else None)
  return out.astype(out_dtype)
