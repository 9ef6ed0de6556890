"""Tests for fedjax_ext.secure_aggregation: exact cancellation, privacy of one
masked update, dropout recovery, and the fixed-point error bound."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_ext import aggregators
from fedjax_ext import secure_aggregation as secagg

KEY = jax.random.key(0)
SCALE = 2.0 ** 16
NUM = 7  # One cohort shape for every masking test: one compile.


def _updates(num_clients=NUM, seed=0):
  rng = np.random.default_rng(seed)
  return {'kernel': jnp.asarray(rng.normal(size=(num_clients, 64, 64)),
                                jnp.float32),
          'bias': jnp.asarray(rng.uniform(-3, 3, size=(num_clients, 5)),
                              jnp.float32)}


def _encoded_sum(encoded, rows):
  return jax.tree.map(
      lambda x: np.asarray(x)[np.asarray(rows)].sum(0, dtype=np.uint32),
      encoded)


@jax.jit
def _mask_and_unmask(encoded, active, submitted):
  masked = secagg.mask_updates(encoded, KEY, active)
  return masked, secagg.unmask_sum(masked, KEY, active, submitted)


def test_encode_decode_round_trip_error():
  x = _updates(3)
  back = jax.jit(lambda t: secagg.decode(secagg.encode(t, SCALE), SCALE))(x)
  for k in x:
    err = np.abs(np.asarray(back[k]) - np.asarray(x[k]))
    assert err.max() <= 0.5 / SCALE, k  # Round to nearest 1 / scale.


def test_masks_cancel_exactly_and_sum_is_within_quantisation_bound():
  num = NUM
  x = _updates()
  encoded = secagg.encode(x, SCALE)
  everyone = jnp.ones(num, bool)
  masked, total = _mask_and_unmask(encoded, everyone, everyone)
  # Ring arithmetic: the unmasked sum equals the sum of encodings bit for bit.
  for k, want in _encoded_sum(encoded, everyone).items():
    np.testing.assert_array_equal(np.asarray(total[k]), want)
    assert not np.array_equal(np.asarray(masked[k]), np.asarray(encoded[k]))
  # Each client rounds by at most 1 / (2 scale), so n of them by n / 2scale.
  decoded = secagg.decode(total, SCALE)
  for k in x:
    plain = np.asarray(x[k], np.float64).sum(0)
    err = np.abs(np.asarray(decoded[k]) - plain)
    assert err.max() <= num / (2 * SCALE) + 1e-6 * np.abs(plain).max(), k


def test_one_masked_update_reveals_nothing():
  n = 64 * 64
  # A strongly structured, all-positive update: without a mask every top
  # bit would be 0 and the correlation with the truth would be 1.
  x = jax.tree.map(
      lambda v: jnp.linspace(1.0, 100.0, v.size, dtype=jnp.float32).reshape(
          v.shape), _updates())
  encoded = secagg.encode(x, SCALE)
  everyone = jnp.ones(NUM, bool)
  masked, _ = _mask_and_unmask(encoded, everyone, everyone)
  view = np.asarray(masked['kernel'][0]).ravel()
  truth = np.asarray(x['kernel'][0], np.float64).ravel()
  assert np.all(np.asarray(encoded['kernel'][0]) >> 31 == 0)
  as_int = view.view(np.int32).astype(np.float64)
  corr = np.corrcoef(as_int, truth)[0, 1]
  assert abs(corr) < 4 / math.sqrt(n)
  # Uniform on Z_2^32: the top bit is a fair coin (std 0.5 / sqrt(n)), and
  # so is the lowest bit, where the fixed-point payload lives.
  assert abs((view >> 31).mean() - 0.5) < 4 * 0.5 / math.sqrt(n)
  assert abs((view & 1).mean() - 0.5) < 4 * 0.5 / math.sqrt(n)


def test_dropouts_before_and_after_masking():
  encoded = secagg.encode(_updates(seed=1), SCALE)
  active = jnp.array([1, 1, 0, 1, 1, 1, 1], bool)  # Client 2 never joined.
  submitted = jnp.array([1, 1, 1, 0, 1, 0, 1], bool)  # 3 and 5 drop later.
  masked, total = _mask_and_unmask(encoded, active, submitted)
  np.testing.assert_array_equal(np.asarray(masked['bias'][2]), 0)
  survivors = np.asarray(active & submitted)
  for k, want in _encoded_sum(encoded, survivors).items():
    np.testing.assert_array_equal(np.asarray(total[k]), want)
  # Without the recovery step the dropped clients' masks would remain.
  naive = jax.tree.map(
      lambda m: np.asarray(m)[survivors].sum(0, dtype=np.uint32), masked)
  assert not np.array_equal(naive['bias'], total['bias'])


def test_pair_masks_are_symmetric_and_distinct():
  pair_mask = jax.jit(secagg.pair_mask, static_argnums=3)
  a = pair_mask(KEY, 1, 4, 8)
  np.testing.assert_array_equal(a, pair_mask(KEY, 4, 1, 8))
  assert not np.array_equal(a, pair_mask(KEY, 1, 3, 8))
  assert not np.array_equal(a, pair_mask(jax.random.key(1), 1, 4, 8))


def test_secure_weighted_mean_matches_plain_weighted_mean():
  num = 6
  x = _updates(num, seed=2)
  x['bias'] = x['bias'].at[4].set(jnp.nan)  # Excluded by weight 0 below.
  weights = jnp.array([1.0, 3.0, 0.0, 2.0, 0.0, 1.0])
  scale = secagg.fixed_point_scale(max_abs=3.0 * 10, num_clients=num)
  secure, metrics = jax.jit(secagg.secure_weighted_mean(scale))(
      x, weights, KEY)
  plain, _ = jax.jit(aggregators.weighted_mean())(x, weights, KEY)
  # Each weighted entry rounds by <= 1 / (2 scale); the mean divides by 7.
  bound = 4 / (2 * scale) / 7 + 1e-6
  for k in x:
    np.testing.assert_allclose(secure[k], plain[k], atol=bound, rtol=1e-6)
  assert metrics['num_included'] == 4
  assert 0 < metrics['secagg_range_used'] < 1


def test_fixed_point_scale_leaves_headroom():
  scale = secagg.fixed_point_scale(max_abs=2.5, num_clients=1000)
  assert math.log2(scale) == int(math.log2(scale))
  assert 1000 * 2.5 * scale < 2 ** 31 <= 1000 * 2.5 * scale * 2 + 256


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='encode'):
    secagg.mask_updates({'w': jnp.ones((3, 2))}, KEY, jnp.ones(3, bool))
  with pytest.raises(ValueError, match='active_mask'):
    secagg.mask_updates({'w': jnp.ones((3, 2), jnp.uint32)}, KEY,
                        jnp.ones(4, bool))
  with pytest.raises(ValueError, match='scale'):
    secagg.encode({'w': jnp.ones(2)}, 0.0)
  with pytest.raises(ValueError, match='max_abs'):
    secagg.fixed_point_scale(0.0, 10)
