"""Tests of fedjax_ext.cohort: pools, sampling and padded cohorts."""
import jax
import numpy as np
import pytest

from fedjax_ext import cohort
from ondevice.data.base import ArrayDataset

# Client sizes 3, 1, 5, 2, 4 (clients 0..4), shuffled over the dataset.
_SIZES = np.array([3, 1, 5, 2, 4])


def _dataset(client_sizes=_SIZES, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.permutation(np.repeat(np.arange(len(client_sizes)), client_sizes))
  n = len(ids)
  # Feature 0 is the example's index, so a cohort reveals where each went.
  x = np.stack([np.arange(n), ids], axis=1).astype(np.float32)
  return ArrayDataset(x=x, y=(np.arange(n) % 3).astype(np.int32),
                      client_id=ids.astype(np.int32),
                      class_names=('a', 'b', 'c'))


def test_pool_groups_examples_by_client():
  ds = _dataset()
  pool = cohort.ClientPool.from_dataset(ds)
  np.testing.assert_array_equal(pool.dataset_ids, np.arange(5))
  np.testing.assert_array_equal(pool.sizes, _SIZES)
  for c in range(5):
    np.testing.assert_array_equal(np.sort(pool.examples_of(c)),
                                  np.flatnonzero(ds.client_id == c))
  assert pool.num_empty == 0


def test_every_example_lands_in_exactly_one_slot():
  ds = _dataset()
  out = cohort.gather_cohort(ds, np.arange(5), max_examples=5,
                             key=jax.random.key(0))
  assert out['x'].shape == (5, 5, 2)
  assert out['y'].shape == out['mask'].shape == (5, 5)
  # Real examples first, then padding, per client.
  for c, n in enumerate(_SIZES):
    np.testing.assert_array_equal(out['mask'][c], [1] * n + [0] * (5 - n))
    np.testing.assert_array_equal(out['x'][c, n:], 0.0)
    np.testing.assert_array_equal(out['x'][c, :n, 1], c)  # Own examples.
  seen = out['x'][..., 0][out['mask'] > 0]
  np.testing.assert_array_equal(np.sort(seen), np.arange(len(ds)))
  # Labels travel with their inputs.
  index = out['x'][..., 0].astype(int)
  np.testing.assert_array_equal(out['y'][out['mask'] > 0],
                                ds.y[index[out['mask'] > 0]])


def test_large_clients_are_subsampled_with_the_key():
  ds = _dataset()
  a = cohort.gather_cohort(ds, [2, 4], max_examples=3, key=jax.random.key(1))
  b = cohort.gather_cohort(ds, [2, 4], max_examples=3, key=jax.random.key(1))
  np.testing.assert_array_equal(a['x'], b['x'])
  np.testing.assert_array_equal(a['mask'], np.ones((2, 3)))
  for row, c in enumerate([2, 4]):
    picked = a['x'][row, :, 0]
    assert len(set(picked.tolist())) == 3  # Without replacement.
    assert set(picked.tolist()) <= set(np.flatnonzero(ds.client_id == c))
  draws = {tuple(cohort.gather_cohort(ds, [2], 3, jax.random.key(s))['x']
                 [0, :, 0]) for s in range(10)}
  assert len(draws) > 1


def test_uniform_sampling_is_without_replacement_and_sorted():
  for seed in range(5):
    ids = np.asarray(cohort.sample_clients(jax.random.key(seed), _SIZES, 4))
    assert len(set(ids.tolist())) == 4
    np.testing.assert_array_equal(ids, np.sort(ids))
    assert ids.min() >= 0 and ids.max() < 5


def test_weighted_sampling_follows_client_size():
  sizes = np.array([1, 1, 1, 97, 0])
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = lambda w: jax.vmap(
      lambda k: cohort.sample_clients(k, sizes, 1, weighted=w))(keys)
  weighted = np.asarray(draw(True))[:, 0]
  uniform = np.asarray(draw(False))[:, 0]
  assert not np.any(weighted == 4) and not np.any(uniform == 4)  # Empty.
  assert np.mean(weighted == 3) > 0.93  # Expected 0.97.
  assert abs(np.mean(uniform == 3) - 0.25) < 0.05


def test_cohort_larger_than_pool_is_an_error():
  with pytest.raises(ValueError, match='larger than the pool of 5'):
    cohort.sample_clients(jax.random.key(0), _SIZES, 6)
  with pytest.raises(ValueError, match='pool of 3 clients with data'):
    cohort.sample_clients(jax.random.key(0), np.array([2, 0, 1, 0, 4]), 4)


def test_empty_clients_are_skipped_and_counted():
  ds = _dataset()
  pool = cohort.ClientPool.from_dataset(ds, num_clients=8)
  assert pool.num_clients == 5 and pool.num_empty == 3
  with pytest.raises(ValueError, match='outside \\[0, 4\\)'):
    cohort.ClientPool.from_dataset(ds, num_clients=4)


def test_dataset_without_clients_is_an_error():
  ds = _dataset()
  ds = ArrayDataset(x=ds.x, y=ds.y, client_id=np.full(len(ds), -1, np.int32),
                    class_names=ds.class_names)
  with pytest.raises(ValueError, match='partition it first'):
    cohort.ClientPool.from_dataset(ds)


def test_mismatched_client_shapes_are_an_error():
  clients = [{'x': np.zeros((3, 4, 2), np.float32), 'y': np.zeros(3)},
             {'x': np.zeros((2, 4, 3), np.float32), 'y': np.zeros(2)}]
  with pytest.raises(ValueError, match='Client 1 has examples of shape'):
    cohort.stack_clients(clients, 4, jax.random.key(0))
  with pytest.raises(ValueError, match='labels of shape'):
    cohort.stack_clients([{'x': np.zeros((3, 2)), 'y': np.zeros(2)}], 4,
                         jax.random.key(0))


def test_repeated_clients_and_bad_layouts_are_errors():
  ds = _dataset()
  with pytest.raises(ValueError, match='repeat a client'):
    cohort.gather_cohort(ds, [1, 1], 4, jax.random.key(0))
  with pytest.raises(ValueError, match='outside the pool'):
    cohort.gather_cohort(ds, [7], 4, jax.random.key(0))
  good = cohort.gather_cohort(ds, [0, 1], 4, jax.random.key(0))
  assert cohort.validate_cohort(good) == (2, 4)
  with pytest.raises(ValueError, match="cohort\\['y'\\] has leading shape"):
    cohort.validate_cohort(dict(good, y=good['y'][:, :3]))
  with pytest.raises(ValueError, match='lacks keys'):
    cohort.validate_cohort({'x': good['x']})
