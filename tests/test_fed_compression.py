"""Tests for fedjax_ext.compression: unbiasedness, error bounds, exact bytes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_ext import compression

KEY = jax.random.key(0)


def test_bytes_of_and_identity_for_known_sizes():
  delta = {'w': jnp.ones((1000,), jnp.float32), 'b': jnp.ones((10,), jnp.int8)}
  assert compression.bytes_of({'w': delta['w']}) == 4000
  assert compression.bytes_of(delta) == 4010
  out, info = jax.jit(compression.identity())({'w': delta['w']}, KEY)
  assert int(info['bytes_sent']) == 4000
  np.testing.assert_array_equal(out['w'], delta['w'])


def test_quantized_bytes_are_payload_plus_one_scale_per_leaf():
  x = {'w': jnp.zeros((1000,)), 'b': jnp.ones((3, 167))}
  assert compression.quantized_bytes({'w': x['w']}, 8) == 1000 + 4
  # 4 bits: 1000 -> 500 bytes; 501 entries -> ceil(250.5) = 251 bytes.
  assert compression.quantized_bytes(x, 4) == (500 + 4) + (251 + 4)


def test_stochastic_quantize_is_unbiased():
  rng = np.random.default_rng(0)
  x = {'w': jnp.asarray(rng.normal(size=(256,)), jnp.float32)}
  num_keys = 4000
  keys = jax.random.split(KEY, num_keys)

  @jax.jit
  def draws(many_keys):
    return [jax.vmap(compression.stochastic_quantize(bits), in_axes=(None, 0))(
        x, many_keys)[0]['w'] for bits in (2, 4)]

  for bits, out in zip((2, 4), draws(keys)):
    levels = 2 ** (bits - 1) - 1
    step = float(jnp.max(jnp.abs(x['w']))) / levels
    mean = np.asarray(out).mean(0)
    # Each draw lies in {floor, floor + step}: std <= step / 2 per entry, so
    # the mean of num_keys draws has std <= step / (2 sqrt(num_keys)); 5 of
    # those over 2 x 256 entries fails with probability < 3e-4.
    tol = 5 * step / (2 * math.sqrt(num_keys))
    np.testing.assert_array_less(np.abs(mean - np.asarray(x['w'])), tol)


def test_stochastic_quantize_error_bound_grid_and_bytes():
  rng = np.random.default_rng(1)
  x = {'a': jnp.asarray(rng.normal(size=(40, 25)), jnp.float32),
       'b': jnp.asarray(rng.uniform(-3, 1, size=(7,)), jnp.float32),
       'zero': jnp.zeros((5,), jnp.float32)}
  out, info = jax.jit(compression.stochastic_quantize(8))(x, KEY)
  # int8 payload plus a float32 scale per leaf: 1000 + 7 + 5 entries.
  assert int(info['bytes_sent']) == (1000 + 4) + (7 + 4) + (5 + 4)
  for name in ('a', 'b'):
    scale = float(jnp.max(jnp.abs(x[name])))
    err = np.abs(np.asarray(out[name]) - np.asarray(x[name]))
    assert err.max() < scale / 127 + 1e-6, name
    on_grid = np.asarray(out[name]) / scale * 127
    np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-3)
  np.testing.assert_array_equal(out['zero'], 0.0)


def test_top_k_keeps_exactly_k_largest_magnitudes():
  rng = np.random.default_rng(2)
  x = {'w': jnp.asarray(rng.normal(size=(20, 50)), jnp.float32),
       'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  out, info = jax.jit(compression.top_k(0.1))(x, KEY)
  w, got = np.asarray(x['w']).ravel(), np.asarray(out['w']).ravel()
  kept = np.flatnonzero(got)
  assert len(kept) == 100
  np.testing.assert_array_equal(np.sort(kept),
                                np.sort(np.argsort(-np.abs(w))[:100]))
  np.testing.assert_array_equal(got[kept], w[kept])
  assert np.count_nonzero(out['b']) == 1  # round(0.3) clamps up to one.
  # Values (float32) + int32 indices.
  assert int(info['bytes_sent']) == (100 + 1) * (4 + 4)


def test_compose_under_vmap_reports_bytes_per_client():
  rng = np.random.default_rng(3)
  cohort = {'w': jnp.asarray(rng.normal(size=(6, 1000)), jnp.float32)}

  def record(delta, key):
    del key
    return delta, {'marker': jnp.float32(1)}

  transform = compression.compose(
      record, compression.top_k(0.5), compression.stochastic_quantize(8))
  keys = jax.random.split(KEY, 6)
  out, info = jax.jit(jax.vmap(transform))(cohort, keys)
  np.testing.assert_array_equal(info['bytes_sent'], [1004] * 6)  # Last wins.
  np.testing.assert_array_equal(info['marker'], [1.0] * 6)
  assert out['w'].shape == (6, 1000)
  # Half the entries were dropped before quantisation; zeros stay zero.
  assert np.all(np.count_nonzero(np.asarray(out['w']), axis=1) <= 500)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='bits'):
    compression.stochastic_quantize(1)
  with pytest.raises(ValueError, match='bits'):
    compression.stochastic_quantize(32)
  with pytest.raises(ValueError, match='fraction'):
    compression.top_k(0.0)
  with pytest.raises(ValueError, match='choose one of'):
    compression.get_compression('gzip')
  with pytest.raises(ValueError, match='not a transform'):
    compression.compose(compression.identity(), 3)
  assert callable(compression.get_compression('top_k', fraction=0.2))
