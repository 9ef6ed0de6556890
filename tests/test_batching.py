"""Tests of ondevice/batching.py against the epochs' permutations laid out."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from ondevice import batching


def _reference_stream(key, n: int, epochs: int) -> np.ndarray:
  """Every epoch's permutation end to end, built without the class."""
  return np.concatenate([
      np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
      for e in range(epochs)])


def test_drop_remainder_slices_each_epoch_and_skips_its_tail():
  key = jax.random.key(3)
  n, b = 10, 3   # 3 steps an epoch; one example unused per epoch.
  batches = batching.EpochBatches(key, n, b)
  assert batches.steps_per_epoch == 3
  stream = _reference_stream(key, n, 3)
  for step in range(9):
    epoch, offset = divmod(step, 3)
    want = stream[epoch * n + offset * b: epoch * n + (offset + 1) * b]
    np.testing.assert_array_equal(batches.indices(step), want)
  # Within one epoch the batches are disjoint.
  seen = np.concatenate([batches(s) for s in range(3)])
  assert len(set(seen.tolist())) == 9


def test_stream_mode_uses_every_example_once_per_epoch():
  key = jax.random.key(0)
  n, b = 10, 4   # Steps 2 and 4 span two epochs.
  batches = batching.EpochBatches(key, n, b, drop_remainder=False)
  got = np.concatenate([batches.indices(s) for s in range(5)])
  np.testing.assert_array_equal(got, _reference_stream(key, n, 2))
  assert sorted(got[:n].tolist()) == list(range(n))
  assert batches.steps_per_epoch == 2.5


def test_stream_mode_batch_larger_than_dataset():
  key = jax.random.key(1)
  batches = batching.EpochBatches(key, 3, 7, drop_remainder=False)
  stream = _reference_stream(key, 3, 5)
  np.testing.assert_array_equal(batches.indices(0), stream[:7])
  np.testing.assert_array_equal(batches.indices(1), stream[7:14])


@pytest.mark.parametrize('drop', [True, False])
def test_indices_depend_only_on_key_and_step(drop):
  key = jax.random.key(7)
  walked = batching.EpochBatches(key, 11, 4, drop_remainder=drop)
  along = [walked(s) for s in range(12)]
  # A resumed run starts a fresh batcher at step 5, and jumps around.
  resumed = batching.EpochBatches(key, 11, 4, drop_remainder=drop)
  for s in [5, 11, 6, 0, 9]:
    np.testing.assert_array_equal(resumed(s), along[s])


def test_int_seed_is_the_key_of_that_seed_and_batch_gathers_rows():
  x = np.arange(20, dtype=np.float32).reshape(10, 2)
  y = np.arange(10, dtype=np.int32) * 10
  by_seed = batching.EpochBatches(4, 10, 5)
  by_key = batching.EpochBatches(jax.random.key(4), 10, 5)
  np.testing.assert_array_equal(by_seed(3), by_key(3))
  batch = by_seed.batch(3, x, y)
  idx = by_seed(3)
  np.testing.assert_array_equal(batch['x'], x[idx])
  np.testing.assert_array_equal(batch['y'], y[idx])
  np.testing.assert_array_equal(batch['mask'], np.ones(5, np.float32))
  np.testing.assert_array_equal(
      batching.epoch_permutation(4, 0, 10),
      np.concatenate([by_seed(0), by_seed(1)]))


@pytest.mark.parametrize('n,b,drop,match', [
    (0, 1, True, 'empty'), (5, 0, True, 'batch_size'),
    (5, 6, True, 'larger than the 5'), (5, -1, False, 'batch_size')])
def test_bad_sizes_raise(n, b, drop, match):
  with pytest.raises(ValueError, match=match):
    batching.EpochBatches(jax.random.key(0), n, b, drop_remainder=drop)


def test_negative_step_raises():
  with pytest.raises(ValueError, match='step'):
    batching.EpochBatches(jax.random.key(0), 5, 2)(-1)
