"""The reservoir buffer keeps a uniform sample of everything offered."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from continual import replay


def _fill(key, n, capacity):
  buf = replay.init(capacity, {'id': jnp.int32(0), 'x': jnp.zeros(2)})
  items = {'id': jnp.arange(n, dtype=jnp.int32),
           'x': jnp.stack([jnp.arange(n), -jnp.arange(n)], 1).astype(
               jnp.float32)}
  return replay.add(buf, items, jnp.ones(n, bool), key)


def test_reservoir_keeps_every_item_with_equal_probability():
  """Each of n items is kept with probability c / n (Vitter's Algorithm R).

  Over R independent runs the count of runs keeping item i is
  Binomial(R, c / n): mean R c / n and sd sqrt(R (c/n)(1 - c/n)). With
  n = 20, c = 5, R = 4000: mean 1000, sd 27.4. We allow 5 sd per item, so a
  correct sampler fails with probability < 20 * 6e-7.
  """
  n, capacity, runs = 20, 5, 4000
  keys = jax.random.split(jax.random.key(0), runs)
  ids = jax.jit(jax.vmap(lambda k: _fill(k, n, capacity).items['id']))(keys)
  ids = np.asarray(ids)
  # Every run holds `capacity` distinct items: none is stored twice.
  assert all(len(set(row)) == capacity for row in ids[:200])
  counts = np.bincount(ids.ravel(), minlength=n)
  p = capacity / n
  sd = np.sqrt(runs * p * (1 - p))
  np.testing.assert_array_less(np.abs(counts - runs * p), 5 * sd)
  # Early items are not favoured over late ones (as "keep the first c"
  # would): items kept from the first half per run are hypergeometric with
  # variance c (1/2)(1/2)(n - c)/(n - 1), so the difference of the halves'
  # totals, 2 * first - R c, has sd 2 sqrt(R c (n - c) / (4 (n - 1))).
  half_sd = 2 * np.sqrt(runs * capacity * (n - capacity) / (4 * (n - 1)))
  assert abs(counts[:10].sum() - counts[10:].sum()) < 5 * half_sd


def test_items_stay_whole_and_invalid_ones_are_skipped():
  buf = _fill(jax.random.key(1), 12, 4)
  np.testing.assert_array_equal(buf.items['x'][:, 0], buf.items['id'])
  np.testing.assert_array_equal(buf.items['x'][:, 1], -buf.items['id'])
  assert int(buf.seen) == 12 and int(replay.size(buf)) == 4

  empty = replay.init(3, {'id': jnp.int32(0)})
  valid = jnp.array([False, True, False, True, False])
  buf = replay.add(empty, {'id': jnp.arange(5, dtype=jnp.int32) + 10}, valid,
                   jax.random.key(2))
  assert int(buf.seen) == 2
  np.testing.assert_array_equal(buf.items['id'][:2], [11, 13])


def test_sampling_is_deterministic_and_masks_an_empty_buffer():
  empty = replay.init(4, {'id': jnp.int32(0)})
  _, mask = replay.sample(empty, jax.random.key(0), 3)
  np.testing.assert_array_equal(mask, np.zeros(3))
  buf = _fill(jax.random.key(3), 3, 8)  # Not full: only slots 0..2 count.
  items, mask = replay.sample(buf, jax.random.key(4), 64)
  np.testing.assert_array_equal(mask, np.ones(64))
  assert set(np.asarray(items['id'])) <= {0, 1, 2}
  again, _ = replay.sample(buf, jax.random.key(4), 64)
  np.testing.assert_array_equal(items['id'], again['id'])
  with pytest.raises(ValueError, match='capacity'):
    replay.init(0, {'id': jnp.int32(0)})
