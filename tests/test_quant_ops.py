"""Tests for int8_dot_general / int8_conv_general_dilated and their VJPs."""
import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from quantized_training import config as qconfig
from quantized_training import quantizers as qz
from quantized_training.config import BwdConfig, FwdConfig, Int8Config
from quantized_training.int8_conv import int8_conv_general_dilated
from quantized_training.int8_dot import int8_dot_general

DENSE = (((1,), (0,)), ((), ()))
NHWC = ('NHWC', 'HWIO', 'NHWC')
KEY = jax.random.key(0)


def _normal(shape, seed, scale=1.0):
  # numpy, so that the checks outside jit do not compile op by op.
  return (np.random.default_rng(seed).normal(size=shape) *
          scale).astype(np.float32)


def _int8_operand_prims(jaxpr):
  """Names of dot/conv primitives whose operands are int8, recursively."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      if all(v.aval.dtype == jnp.int8 for v in eqn.invars):
        found.append(eqn.primitive.name)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      found += _int8_operand_prims(sub)
  return found


def _conv(cfg, fg=1, strides=(1, 1), padding='SAME'):
  return functools.partial(int8_conv_general_dilated, window_strides=strides,
                           padding=padding, dimension_numbers=NHWC,
                           feature_group_count=fg, config=cfg, key=KEY)


def _dense(cfg):
  return functools.partial(int8_dot_general, dimension_numbers=DENSE,
                           config=cfg, key=KEY)


_INT_SR = qconfig.uniform(8, stochastic_rounding=True, use_int=True)
_SIM_SR = qconfig.uniform(8, stochastic_rounding=True)


@pytest.mark.parametrize('kind', ['dense', 'conv', 'depthwise'])
def test_jaxpr_has_int8_matmuls_in_forward_and_gradient(kind):
  if kind == 'dense':
    x, w = _normal((8, 16), 0), _normal((16, 4), 1)
    op, name = _dense, 'dot_general'
  else:
    fg = 1 if kind == 'conv' else 4
    x, w = _normal((2, 6, 5, 4), 0), _normal((3, 3, 4 // fg, 4), 1)
    op, name = functools.partial(_conv, fg=fg), 'conv_general_dilated'

  def loss(x, w, cfg):
    return jnp.sum(op(cfg)(x, w) ** 2)

  fwd = jax.make_jaxpr(lambda x, w: op(_INT_SR)(x, w))(x, w).jaxpr
  assert _int8_operand_prims(fwd) == [name]
  grad = jax.make_jaxpr(jax.grad(functools.partial(loss, cfg=_INT_SR),
                                 (0, 1)))(x, w).jaxpr
  # Forward, input gradient and weight gradient: three int8 matmuls.
  assert _int8_operand_prims(grad) == [name] * 3
  sim = jax.make_jaxpr(jax.grad(functools.partial(loss, cfg=_SIM_SR),
                                (0, 1)))(x, w).jaxpr
  assert not _int8_operand_prims(sim)


@pytest.mark.parametrize('kind', ['dense', 'batched_dot', 'conv'])
def test_simulated_and_integer_paths_agree(kind):
  if kind == 'dense':
    x, w = _normal((16, 32), 2), _normal((32, 8), 3)
    make = _dense
  elif kind == 'batched_dot':
    # Batch axis, two contracting axes in odd positions.
    x, w = _normal((3, 5, 4, 2), 2), _normal((2, 3, 6, 4), 3)
    dims = (((2, 3), (3, 0)), ((0,), (1,)))
    make = lambda cfg: functools.partial(  # pylint: disable=g-long-lambda
        int8_dot_general, dimension_numbers=dims, config=cfg, key=KEY)
  else:
    x, w = _normal((2, 7, 6, 3), 2), _normal((3, 2, 3, 5), 3)
    make = functools.partial(_conv, strides=(2, 1), padding=((1, 0), (0, 1)))

  @jax.jit
  def value_and_grads(x, w):
    out = []
    for cfg in (_SIM_SR, _INT_SR):
      f = lambda x, w, cfg=cfg: jnp.sum(jnp.sin(make(cfg)(x, w)))
      out.append(jax.value_and_grad(f, (0, 1))(x, w))
    return out

  # Sums of < 2**24 / 127**2 products are exact in float32: the two paths
  # must agree to float32 rounding of the rescaling.
  sim, real = value_and_grads(x, w)
  for a, b in zip(jax.tree.leaves(sim), jax.tree.leaves(real)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _forward_error_bound(x, w, sx, sw, contract):
  """|x.w - Q(x).Q(w)| <= sum_k |x||dw| + |dx||w| + |dx||dw| per output."""
  return (contract(jnp.abs(x), sw / 2 * jnp.ones_like(w)) +
          contract(sx / 2 * jnp.ones_like(x), jnp.abs(w)) +
          contract(sx / 2 * jnp.ones_like(x), sw / 2 * jnp.ones_like(w)))


def test_dense_forward_within_derived_error_bound():
  x, w = _normal((16, 64), 4), _normal((64, 8), 5, 0.1)

  @jax.jit
  def error_and_bound(x, w):
    y = int8_dot_general(x, w, DENSE)
    sx = qz.absmax_scale(x, (1,), 8)  # per example
    sw = qz.absmax_scale(w, (0,), 8)  # per output channel
    return jnp.abs(y - x @ w), _forward_error_bound(x, w, sx, sw, jnp.dot)

  error, bound = map(np.asarray, error_and_bound(x, w))
  assert np.all(error <= bound * (1 + 1e-5))


def test_depthwise_conv_forward_within_derived_error_bound():
  x, w = _normal((2, 8, 8, 6), 4), _normal((3, 3, 1, 6), 5)
  conv = lambda a, b: lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      a, b, (1, 1), 'SAME', dimension_numbers=NHWC, feature_group_count=6)

  @jax.jit
  def error_and_bound(x, w):
    y = _conv(qconfig.uniform(8), fg=6)(x, w)
    sx = qz.absmax_scale(x, (1, 2, 3), 8)  # per example
    sw = qz.absmax_scale(w, (0, 1, 2), 8)  # per output channel
    return jnp.abs(y - conv(x, w)), _forward_error_bound(x, w, sx, sw, conv)

  error, bound = map(np.asarray, error_and_bound(x, w))
  assert np.all(error <= bound * (1 + 1e-5) + 1e-6)


def _ste_surrogate(x0, w0, f):
  """loss(x, w) with each quantiser replaced by identity plus its offset."""
  offsets = jax.jit(lambda x, w: (
      qz.Quantizer(channel_axes=(0,)).fake_quant(x) - x,  # per example
      qz.Quantizer(channel_axes=(1,)).fake_quant(w) - w))  # per channel
  cx, cw = offsets(x0, w0)
  return lambda x, w: f((x + cx) @ (w + cw))


def test_custom_vjp_matches_finite_differences_of_straight_through_surrogate():
  x0, w0 = _normal((6, 12), 6), _normal((12, 5), 7, 0.3)
  config = Int8Config(dlhs=BwdConfig(bits=None), drhs=BwdConfig(bits=None))
  f = lambda y: jnp.sum(jnp.sin(y))
  grads = jax.jit(jax.grad(lambda x, w: f(int8_dot_general(
      x, w, DENSE, config=config)), (0, 1)))(x0, w0)
  surrogate = jax.jit(_ste_surrogate(x0, w0, f))
  eps = 1e-2
  for seed in range(3):
    dx, dw = _normal(x0.shape, 20 + seed), _normal(w0.shape, 30 + seed)
    fd = (surrogate(x0 + eps * dx, w0 + eps * dw) -
          surrogate(x0 - eps * dx, w0 - eps * dw)) / (2 * eps)
    analytic = np.vdot(grads[0], dx) + np.vdot(grads[1], dw)
    np.testing.assert_allclose(float(analytic), float(fd), rtol=2e-3,
                               atol=1e-3)


def _reference_int8_grads(x, w, g):
  """Quantised backward written out in numpy (round-to-nearest)."""
  def quant(a, axis):
    s = np.max(np.abs(a), axis=axis, keepdims=True) / 127
    s = np.where(s > 0, s, 1.0)
    return np.clip(np.round(a / s), -127, 127), s
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  qx, sx = quant(x, 1)  # per example
  qw, sw = quant(w, 0)  # per output channel
  qg_l, sg_l = quant(g * sw, 1)  # weight scale folded in, per example
  dx = (qg_l @ qw.T) * sg_l
  qg_r, sg_r = quant(g * sx, 0)  # activation scale folded in, per channel
  dw = (qx.T @ qg_r) * sg_r
  return dx, dw


def test_quantised_backward_matches_reference_implementation():
  x, w, g = _normal((32, 24), 8), _normal((24, 16), 9), _normal((32, 16), 10)

  @jax.jit
  def grads(x, w, g):
    _, vjp = jax.vjp(lambda x, w: int8_dot_general(
        x, w, DENSE, config=qconfig.uniform(8)), x, w)
    return vjp(g)

  dx, dw = grads(x, w, g)
  ref_dx, ref_dw = _reference_int8_grads(x, w, g)
  # Round-half cases can differ by one code between numpy's division and our
  # multiplication by the reciprocal: allow one step of one product.
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-2)
  assert float(np.mean(np.abs(np.asarray(dx) - ref_dx))) < 1e-4


def test_stochastic_rounding_of_gradients_is_unbiased():
  x, w = _normal((4, 16), 11), _normal((16, 3), 12)
  g = _normal((4, 3), 13)
  cfg = qconfig.uniform(8, stochastic_rounding=True)
  det = Int8Config(dlhs=BwdConfig(bits=None), drhs=BwdConfig(bits=None))

  def grads(config, key):
    _, vjp = jax.vjp(lambda x, w: int8_dot_general(
        x, w, DENSE, config=config, key=key), x, w)
    return vjp(g)

  n = 1000
  keys = jax.random.split(jax.random.key(1), n)
  samples = jax.jit(jax.vmap(lambda k: grads(cfg, k)))(keys)
  exact = jax.jit(lambda: grads(det, None))()  # same codes, float bwd
  for s, e in zip(samples, exact):
    s, e = np.asarray(s), np.asarray(e)
    mean, sd = s.mean(0), s.std(0)
    assert np.all(np.abs(mean - e) <= 4 * sd / np.sqrt(n) + 1e-6)


def test_same_key_same_gradients_and_missing_key_raises():
  x, w = _normal((8, 16), 14), _normal((16, 4), 15)
  cfg = qconfig.uniform(8, stochastic_rounding=True)
  grad = jax.jit(jax.grad(lambda x, w, k: jnp.sum(int8_dot_general(
      x, w, DENSE, config=cfg, key=k) ** 2), (0, 1)))
  a = grad(x, w, jax.random.key(3))
  b = grad(x, w, jax.random.key(3))
  c = grad(x, w, jax.random.key(4))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert any(np.any(np.asarray(u) != np.asarray(v)) for u, v in zip(a, c))
  with pytest.raises(ValueError, match='key'):
    jax.jit(jax.grad(lambda x: jnp.sum(int8_dot_general(
        x, w, DENSE, config=cfg))))(x)


def test_zero_grad_outside_clip_masks_clipped_inputs():
  x, w = _normal((4, 32), 16), _normal((32, 3), 17)
  cfg = Int8Config(fwd=FwdConfig(clip_ratio=0.5, zero_grad_outside_clip=True),
                   dlhs=BwdConfig(bits=None), drhs=BwdConfig(bits=None))
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(int8_dot_general(
      x, w, DENSE, config=cfg)), (0, 1)))(x, w)
  dx, dw = np.asarray(dx), np.asarray(dw)
  clipped_x = np.abs(x) > 0.5 * np.abs(x).max(1, keepdims=True)
  clipped_w = np.abs(w) > 0.5 * np.abs(w).max(0, keepdims=True)
  assert np.all(np.where(clipped_x, dx == 0, dx != 0))
  assert np.all(np.where(clipped_w, dw == 0, True))
  assert np.any(clipped_x) and np.any(clipped_w)


@pytest.mark.parametrize('build', [
    lambda: FwdConfig(bits=16, use_int=True),
    lambda: FwdConfig(clip_ratio=1.5),
    lambda: BwdConfig(bits=1),
    lambda: Int8Config(noise_impl='philox'),
    lambda: Int8Config(fwd=BwdConfig()),
    lambda: Int8Config(fwd=FwdConfig(bits=12), dlhs=BwdConfig(use_int=True)),
])
def test_config_rejects_bad_settings(build):
  with pytest.raises(ValueError):
    build()
