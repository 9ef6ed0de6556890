"""``int8_conv_general_dilated``: a convolution with int8 fwd and bwd.

The convolution analogue of ``int8_dot``: one ``jax.custom_vjp`` quantises the
forward convolution and both of its transposes (input gradient and weight
gradient) as configured by ``Int8Config``. Scales must factor out of every
sum a convolution takes, so activations get one scale per example (a sliding
window mixes positions and channels) and kernels one per output feature;
in the backward pass the gradient gets one scale per example for the input
gradient and one per output feature for the weight gradient, after the saved
operand's scale has been folded into it (as in Zhu et al. 2020, "Towards
Unified INT8 Training for Convolutional Neural Network", and AQT).

Transposed convolutions come from ``jax.linear_transpose`` of the forward
convolution, so strides, padding, dilations and feature groups (depthwise
convolutions) are handled by JAX's own rules. For the real integer path the
transposed computation is traced once in float32 and replayed on the int8
codes with each convolution asked for an int32 result.

``impl`` picks how the convolutions of codes are computed. 'lax' (the
reference) calls ``lax.conv_general_dilated``. 'cpu_friendly' runs the same
quantised convolutions through the fast CPU forms of
``ondevice.models.layers`` (XLA:CPU conv gradients are pathological, above
all for depthwise convs): a depthwise conv becomes k*k shifted elementwise
multiply-adds of the int8 codes and a dense conv an im2col matmul
``patches(q_x) @ q_w``; their transposes (also from ``jax.linear_transpose``)
are shifted sums and matmuls of the quantised gradient with the saved codes.
Codes, scales and dither are those of 'lax', so the two agree up to float32
summation order. 'cpu_friendly' runs on integer-valued float32 codes (the
simulated path) only; the real integer path keeps 'lax'.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax import lax

from ondevice.models import layers as model_layers
from quantized_training import quantizers
from quantized_training.config import BwdConfig, Int8Config
from quantized_training.int8_dot import code_dtype, SavedOperand

DEFAULT_CONFIG = Int8Config()
IMPLS = ('lax', 'cpu_friendly')

# Primitives that only move data; safe to replay on int8 codes.
_LAYOUT_PRIMITIVES = frozenset({
    'rev', 'reshape', 'transpose', 'squeeze', 'expand_dims',
    'broadcast_in_dim', 'copy', 'copy_p', 'slice', 'pad'})


class ConvParams(NamedTuple):
  """Static (hashable) arguments of one convolution."""
  window_strides: tuple[int, ...]
  padding: Any  # a padding string or a tuple of (low, high) pairs
  lhs_dilation: tuple[int, ...] | None
  rhs_dilation: tuple[int, ...] | None
  dimension_numbers: lax.ConvDimensionNumbers
  feature_group_count: int
  precision: Any
  impl: str = 'lax'


def _conv(lhs, rhs, p: ConvParams, preferred_element_type=jnp.float32):
  if p.impl == 'cpu_friendly':
    # Float32 operands only (checked in int8_conv_general_dilated).
    return model_layers.cpu_friendly_conv_general_dilated(
        lhs, rhs, p.window_strides, p.padding, lhs_dilation=p.lhs_dilation,
        rhs_dilation=p.rhs_dilation, dimension_numbers=p.dimension_numbers,
        feature_group_count=p.feature_group_count, precision=p.precision)
  return lax.conv_general_dilated(
      lhs, rhs, p.window_strides, p.padding, lhs_dilation=p.lhs_dilation,
      rhs_dilation=p.rhs_dilation, dimension_numbers=p.dimension_numbers,
      feature_group_count=p.feature_group_count,
      precision=None if preferred_element_type == jnp.int32 else p.precision,
      preferred_element_type=preferred_element_type)


def _replay_with_int_convs(closed: jex_core.ClosedJaxpr, *args):
  """Evaluates a float-traced layout+conv jaxpr on integer codes."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    env[v] = c
  for v, a in zip(closed.jaxpr.invars, args):
    env[v] = a
  for eqn in closed.jaxpr.eqns:
    params = dict(eqn.params)
    if eqn.primitive is lax.conv_general_dilated_p:
      params['preferred_element_type'] = jnp.int32
      params['precision'] = None
    elif eqn.primitive.name not in _LAYOUT_PRIMITIVES:
      raise NotImplementedError(
          f'The integer conv path cannot replay {eqn.primitive.name!r}; set '
          'use_int=False for this layer.')
    outs = eqn.primitive.bind(*(read(v) for v in eqn.invars), **params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return read(closed.jaxpr.outvars[0]).astype(jnp.float32)


def _transposed_conv(wrt: str, cotangent, other, primal_shape,
                     p: ConvParams, use_int: bool):
  """The transpose of the conv w.r.t. ``wrt`` ('lhs'/'rhs'), applied to g."""
  f32 = jnp.float32
  primal = jax.ShapeDtypeStruct(primal_shape, f32)

  def transpose(ct, fixed):
    def linear(x):
      return _conv(x, fixed, p) if wrt == 'lhs' else _conv(fixed, x, p)
    return jax.linear_transpose(linear, primal)(ct)[0]

  if not use_int:
    return transpose(cotangent.astype(f32), other.astype(f32))
  closed = jax.make_jaxpr(transpose)(
      jax.ShapeDtypeStruct(cotangent.shape, f32),
      jax.ShapeDtypeStruct(other.shape, f32))
  return _replay_with_int_convs(closed, cotangent, other)


def _all_but(axis: int, ndim: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a != axis)


def _place(scale, axis: int, ndim: int):
  """Reshapes a scale with one non-unit axis to sit on ``axis`` of ndim."""
  if scale.size == 1:
    return scale.reshape(())
  return scale.reshape(tuple(-1 if a == axis else 1 for a in range(ndim)))


def _quantize_operand(x, keep_axis, per_channel, config: Int8Config,
                      bwd: BwdConfig):
  f = config.fwd
  if f.bits is None:
    return SavedOperand(x, None, None), x
  axes = _all_but(keep_axis, x.ndim) if per_channel else None
  scale = quantizers.absmax_scale(x, axes, f.bits, f.clip_ratio)
  codes = quantizers.quantize(x, scale, f.bits,
                              dtype=code_dtype(f.use_int, f.bits))
  inside = None
  if f.zero_grad_outside_clip and f.clip_ratio < 1.0:
    inside = jnp.abs(x) <= scale * quantizers.qmax(f.bits)
  saved_dtype = (code_dtype(bwd.use_int, f.bits) if bwd.quantized
                 else jnp.float32)
  return SavedOperand(codes.astype(saved_dtype), scale, inside), codes


def _forward(p: ConvParams, config: Int8Config, lhs, rhs):
  lhs_spec, rhs_spec, out_spec = p.dimension_numbers
  f = config.fwd
  sl, ql = _quantize_operand(lhs, lhs_spec[0], f.lhs_per_channel, config,
                             config.drhs)
  sr, qr = _quantize_operand(rhs, rhs_spec[0], f.rhs_per_channel, config,
                             config.dlhs)
  if f.bits is None:
    return _conv(lhs, rhs, p, jnp.float32), sl, sr
  out_dtype = jnp.int32 if f.use_int else jnp.float32
  out = _conv(ql, qr, p, out_dtype).astype(jnp.float32)
  ndim = out.ndim
  out = out * (_place(sl.scale, out_spec[0], ndim) *
               _place(sr.scale, out_spec[1], ndim))
  return out, sl, sr


def _grad_conv(wrt: str, g, keep_axis: int, saved: SavedOperand,
               primal_shape, result_axis: int, p: ConvParams,
               cfg: BwdConfig, dither):
  """One transposed conv of the (already rescaled) gradient ``g``."""
  if not cfg.quantized:
    return _transposed_conv(wrt, g, saved.values.astype(jnp.float32),
                            primal_shape, p, False)
  values, extra = saved.values, None
  if saved.scale is None:
    # Forward kept this operand in float: quantise it per-tensor here.
    s = quantizers.absmax_scale(values, None, cfg.bits)
    values = quantizers.quantize(values, s, cfg.bits,
                                 dtype=code_dtype(cfg.use_int, cfg.bits))
    extra = s.reshape(())
  axes = _all_but(keep_axis, g.ndim) if cfg.per_channel else None
  sg = quantizers.absmax_scale(g, axes, cfg.bits)
  qg = quantizers.quantize(g, sg, cfg.bits,
                           dither=dither if cfg.stochastic_rounding else None,
                           dtype=code_dtype(cfg.use_int, cfg.bits))
  out = _transposed_conv(wrt, qg, values, primal_shape, p, cfg.use_int)
  out = out * _place(sg, result_axis, out.ndim)
  return out if extra is None else out * extra


def _backward(p: ConvParams, config: Int8Config, lhs_shape, rhs_shape, sl,
              sr, key, g):
  lhs_spec, rhs_spec, out_spec = p.dimension_numbers
  g = g.astype(jnp.float32)
  dither = None
  if config.needs_rng:
    if key is None:
      raise ValueError(
          'This Int8Config rounds gradients stochastically, so the backward '
          'pass needs a PRNG key: pass key= to int8_conv_general_dilated, or '
          "rngs={'quant': key} to the flax apply.")
    dither = quantizers.uniform_dither(key, g.shape, config.noise_bits,
                                       config.noise_impl)
  g_l = g if sr.scale is None else g * _place(sr.scale, out_spec[1], g.ndim)
  dlhs = _grad_conv('lhs', g_l, out_spec[0], sr, lhs_shape, lhs_spec[0], p,
                    config.dlhs, dither)
  g_r = g if sl.scale is None else g * _place(sl.scale, out_spec[0], g.ndim)
  drhs = _grad_conv('rhs', g_r, out_spec[1], sl, rhs_shape, rhs_spec[0], p,
                    config.drhs, dither)
  if sl.inside is not None:
    dlhs = jnp.where(sl.inside, dlhs, 0.0)
  if sr.inside is not None:
    drhs = jnp.where(sr.inside, drhs, 0.0)
  return dlhs, drhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _int8_conv(p, config, lhs, rhs, key):
  return _forward(p, config, lhs, rhs)[0]


def _int8_conv_fwd(p, config, lhs, rhs, key):
  out, sl, sr = _forward(p, config, lhs, rhs)
  return out, (sl, sr, key)


def _int8_conv_bwd(p, config, res, g):
  sl, sr, key = res
  # Saved values (codes or floats) keep their operand's shape.
  dlhs, drhs = _backward(p, config, sl.values.shape, sr.values.shape, sl, sr,
                         key, g)
  return dlhs, drhs, None


_int8_conv.defvjp(_int8_conv_fwd, _int8_conv_bwd)


def uses_int_path(config: Int8Config) -> bool:
  """Whether any quantised conv of ``config`` runs int8 x int8 -> int32."""
  return ((config.fwd.use_int and config.fwd.bits is not None) or
          (config.dlhs.use_int and config.dlhs.quantized) or
          (config.drhs.use_int and config.drhs.quantized))


def _static_padding(padding):
  if isinstance(padding, str):
    return padding
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _static_tuple(x):
  return None if x is None else tuple(int(v) for v in x)


def int8_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides, padding,
    lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
    feature_group_count: int = 1, batch_group_count: int = 1,
    precision: Any = None, preferred_element_type: Any = None, *,
    config: Int8Config = DEFAULT_CONFIG,
    key: jax.Array | None = None, impl: str = 'lax') -> jax.Array:
  """``lax.conv_general_dilated`` with quantised forward and backward convs.

  Arguments are those of ``lax.conv_general_dilated`` plus ``config`` (which
  convs are quantised and how), ``key`` (for stochastic rounding of the
  gradient; required only when ``config.needs_rng`` and a gradient is taken)
  and ``impl`` ('lax' or 'cpu_friendly', see the module docstring).
  """
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}.')
  if impl == 'cpu_friendly' and uses_int_path(config):
    raise ValueError(
        "impl='cpu_friendly' runs the simulated (float32 codes) path only; "
        "this config sets use_int=True somewhere: pass impl='lax' or "
        'use_int=False.')
  if config.is_float:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  if batch_group_count != 1:
    raise ValueError('int8_conv_general_dilated supports batch_group_count=1 '
                     f'only (got {batch_group_count}); use a float conv.')
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if isinstance(precision, list):
    precision = tuple(precision)
  p = ConvParams(_static_tuple(window_strides), _static_padding(padding),
                 _static_tuple(lhs_dilation), _static_tuple(rhs_dilation), dn,
                 int(feature_group_count), precision, impl)
  out = _int8_conv(p, config, lhs.astype(jnp.float32),
                   rhs.astype(jnp.float32),
                   key if config.needs_rng else None)
  return out.astype(out_dtype)
