"""Tests for quantized_training.quantizers: error bounds, unbiasedness, STE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantized_training import quantizers as qz


def _data(shape, seed=0):
  # Rows of very different magnitudes, so per-channel scales differ.
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * np.exp(rng.normal(size=shape[:1] + (1,) *
                                                 (len(shape) - 1)))
  return jnp.asarray(x, jnp.float32)


_RTN_CASES = ((8, (1,)), (8, (0,)), (8, None), (4, (1,)))


def test_round_to_nearest_error_at_most_half_a_step():
  x = _data((32, 48))

  @jax.jit
  def run(x):  # per row, per column, per tensor, and 4 bits per row
    out = []
    for bits, axes in _RTN_CASES:
      s = qz.absmax_scale(x, axes, bits)
      out.append((s, qz.quantize(x, s, bits)))
    return out

  x_np = np.asarray(x)
  for (bits, _), (s, q) in zip(_RTN_CASES, run(x)):
    s, q = np.asarray(s), np.asarray(q)
    assert np.abs(q).max() <= qz.qmax(bits)
    np.testing.assert_array_equal(q, np.round(q))  # integer-valued codes
    err = np.abs(x_np - q * s)
    # s/2 plus float32 rounding of x/s (a few ulps of |x|).
    assert np.all(err <= s / 2 + 4e-7 * np.abs(x_np) + 1e-12)


def test_stochastic_rounding_error_below_one_step():
  x = _data((16, 64))

  @jax.jit
  def run(x, key):
    s = qz.absmax_scale(x, (1,), 8)
    errors = []
    for impl in ('hash', 'threefry'):
      dither = qz.uniform_dither(key, x.shape, 8, impl)
      q = qz.quantize(x, s, 8, dither=dither)
      errors.append(jnp.abs(x - qz.dequantize(q, s)))
    return s, errors

  s, errors = run(x, jax.random.key(3))
  for err in errors:
    assert np.all(np.asarray(err) < np.asarray(s) * (1 + 1e-6))


@pytest.mark.parametrize('impl,noise_bits', [('hash', 16), ('threefry', 8)])
def test_dither_is_uniform_on_open_unit_interval(impl, noise_bits):
  n = 200_000
  draw = jax.jit(lambda k: qz.uniform_dither(k, (n,), noise_bits, impl))
  u = np.asarray(draw(jax.random.key(0)))
  assert u.min() > 0 and u.max() < 1
  # Mean 1/2 and variance 1/12 (minus the grid's 1/(12 * 4**b)), 5 std errs.
  assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
  var = 1 / 12 - 1 / (12 * 4**noise_bits)
  assert abs(u.var() - var) < 5 * np.sqrt(1 / 180 / n)  # Var of (u-m)^2
  hist = np.bincount((u * 16).astype(int), minlength=16) / n
  np.testing.assert_allclose(hist, 1 / 16, atol=5 * np.sqrt(1 / 16 / n))


@pytest.mark.parametrize('impl', ['hash', 'threefry'])
def test_stochastic_rounding_is_unbiased_over_keys(impl):
  bits, n_keys = 8, 4000
  # Values whose x/s sweep fractional parts over [0, 1), for a fixed scale.
  scale = jnp.full((1,), 0.01)
  x = (jnp.linspace(-50.0, 50.0, 97) + 0.37) * 0.01

  def one(key):
    d = qz.uniform_dither(key, x.shape, 16, impl)
    return qz.dequantize(qz.quantize(x, scale, bits, dither=d), scale)

  keys = jax.random.split(jax.random.key(7), n_keys)
  mean = np.asarray(jax.jit(lambda k: jnp.mean(jax.vmap(one)(k), 0))(keys))
  x, scale = np.asarray(x), np.asarray(scale)
  frac = x / scale - np.floor(x / scale)
  # Each sample is floor or ceil: std err = s * sqrt(p (1 - p) / N). Allow 4
  # of them, plus one sample's worth s / N (for p near 0 or 1, where the
  # normal approximation fails) and the 16-bit dither grid's bias s * 2**-17.
  stderr = 0.01 * np.sqrt(frac * (1 - frac) / n_keys)
  tol = 4 * stderr + 0.01 / n_keys + 0.01 * 2**-17
  assert np.all(np.abs(np.asarray(mean - x)) <= tol)
  # The average over all 97 values is tighter still.
  assert abs(np.mean(mean - x)) < 4 * 0.01 * 0.5 / np.sqrt(97 * n_keys)


def test_round_to_nearest_is_biased_where_stochastic_is_not():
  # A constant 0.3 of a step rounds to 0 every time; SR averages to 0.3.
  x, s = jnp.full((10_000,), 0.3), jnp.ones(())

  @jax.jit
  def run(key):
    d = qz.uniform_dither(key, x.shape)
    return (jnp.mean(qz.quantize(x, s, 8)),
            jnp.mean(qz.quantize(x, s, 8, dither=d)))

  rtn_mean, sr_mean = map(float, run(jax.random.key(1)))
  assert rtn_mean == 0.0
  assert abs(sr_mean - 0.3) < 4 * np.sqrt(0.21 / 10_000)


def test_same_key_same_codes_and_different_key_different_codes():
  x = _data((8, 32))
  quant = jax.jit(qz.Quantizer(bits=8, channel_axes=(0,),
                               stochastic=True).quantize)
  a, sa = quant(x, jax.random.key(5))
  b, sb = quant(x, jax.random.key(5))
  c, _ = quant(x, jax.random.key(6))
  assert a.dtype == jnp.int8
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(sa, sb)
  assert np.any(np.asarray(a) != np.asarray(c))


def test_quantizer_channel_axes_give_per_channel_scales():
  w = jax.ShapeDtypeStruct((5, 7), jnp.float32)
  shape = lambda q: jax.eval_shape(q.scale, w).shape
  assert shape(qz.Quantizer(channel_axes=(-1,))) == (1, 7)
  assert shape(qz.Quantizer(channel_axes=(0,))) == (5, 1)
  assert shape(qz.Quantizer()) == (1, 1)


def test_fake_quant_straight_through_gradient_is_identity():
  x = _data((6, 10))
  quant = qz.Quantizer(channel_axes=(0,))
  g = _data((6, 10), seed=2)

  @jax.jit
  def run(x, g):
    y, vjp = jax.vjp(lambda v: qz.fake_quant(v, None, quant), x)
    q, s = quant.quantize(x)
    return y, qz.dequantize(q, s), vjp(g)[0]

  y, expected, x_bar = run(x, g)
  np.testing.assert_allclose(y, expected, rtol=1e-6)
  np.testing.assert_array_equal(x_bar, g)


def test_fake_quant_matches_finite_differences_of_clipped_surrogate():
  x0 = _data((4, 12))
  quant = qz.Quantizer(channel_axes=(0,), clip_ratio=0.6,
                       zero_grad_outside_clip=True)

  @jax.jit
  def bound_and_offset(x):
    bound = quant.scale(x) * qz.qmax(8)
    return bound, quant.fake_quant(x) - jnp.clip(x, -bound, bound)

  bound, offset = bound_and_offset(x0)

  @jax.jit
  def surrogate(x):  # straight-through: clip, plus a constant rounding offset
    return jnp.sum(jnp.sin(jnp.clip(x, -bound, bound) + offset))

  def loss(x):
    return jnp.sum(jnp.sin(quant.fake_quant(x)))

  grad = np.asarray(jax.jit(jax.grad(loss))(x0))
  assert np.mean(grad == 0) > 0.05  # some entries were clipped
  eps, x0 = 1e-3, np.asarray(x0)
  for seed in range(3):
    d = np.random.default_rng(10 + seed).normal(size=x0.shape)
    fd = (surrogate(x0 + eps * d) - surrogate(x0 - eps * d)) / (2 * eps)
    np.testing.assert_allclose(np.vdot(grad, d), float(fd), rtol=2e-3,
                               atol=2e-3)


@pytest.mark.parametrize('kwargs', [dict(bits=1), dict(bits=17),
                                    dict(clip_ratio=0.0),
                                    dict(noise_bits=32)])
def test_quantizer_rejects_bad_settings(kwargs):
  with pytest.raises(ValueError):
    qz.Quantizer(**kwargs)


def test_stochastic_quantizer_without_key_says_how_to_fix():
  with pytest.raises(ValueError, match='key'):
    jax.eval_shape(qz.Quantizer(stochastic=True).quantize,
                   jax.ShapeDtypeStruct((3,), jnp.float32))
