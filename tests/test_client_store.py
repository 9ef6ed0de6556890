"""Tests of ondevice.data.client_store: build, resume, refuse, gather."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fedjax_ext import cohort as cohort_lib
from ondevice.data import client_store
from ondevice.data.base import ArrayDataset

FEATURES = (3, 4)
CLASSES = ('a', 'b', 'c')
# Client sizes of the 3 shards (0 = a client without examples: skipped).
SHARD_SIZES = ((2, 5, 1), (3, 0, 7), (4, 1))


def _client(shard: int, j: int, n: int) -> dict:
  rng = np.random.default_rng(100 * shard + j)
  return {'x': rng.uniform(-2.0, 6.0, (n,) + FEATURES).astype(np.float32),
          'y': rng.integers(0, len(CLASSES), n), 'id': 10 * shard + j}


def _make_shard(index: int) -> list[dict]:
  return [_client(index, j, n) for j, n in enumerate(SHARD_SIZES[index])]


def _quantizer(dtype='int16'):
  return client_store.Quantizer.from_range(np.full(4, -2.0), np.full(4, 6.0),
                                           dtype)


def _build(root, make_shard=_make_shard, **kwargs):
  return client_store.build_store(
      str(root), len(SHARD_SIZES), make_shard, feature_shape=FEATURES,
      class_names=CLASSES, quantizer=kwargs.pop('quantizer', _quantizer()),
      info={'seed': 0}, **kwargs)


def test_quantizer_error_is_at_most_half_a_step():
  q = _quantizer('uint8')
  x = np.random.default_rng(0).uniform(-2.0, 6.0, (50, 4)).astype(np.float32)
  stored, clipped = q.quantize(x)
  assert stored.dtype == np.uint8 and clipped == 0
  step = 8.0 / 255
  np.testing.assert_allclose(q.scale, step, rtol=1e-6)
  assert np.max(np.abs(q.dequantize(stored) - x)) <= step / 2 + 1e-5
  # The range ends map onto the integer range ends; outside values clip.
  stored, clipped = q.quantize(np.array([[-2.0, 6.0, -9.0, 9.0]]))
  assert stored.tolist() == [[0, 255, 0, 255]] and clipped == 2


def test_store_counts_and_clients(tmp_path):
  store = _build(tmp_path)
  assert store.num_clients == 7 and store.num_empty == 1
  assert store.sizes.tolist() == [2, 5, 1, 3, 7, 4, 1]
  assert store.num_examples == 23
  # Pool client 4 is shard 1's third client (its second one is empty).
  assert store.dataset_ids([0, 4, 6]).tolist() == [0, 12, 21]
  want = _client(1, 2, 7)
  got = store.client(4)
  assert np.max(np.abs(got['x'] - want['x'])) <= 8.0 / 65535 / 2 + 1e-6
  np.testing.assert_array_equal(got['y'], want['y'])
  # Stored as int16 on disk.
  assert np.load(os.path.join(tmp_path, 'shard_00001', 'x.npy'),
                 mmap_mode='r').dtype == np.int16


@pytest.mark.parametrize('max_examples', [1, 3, 8])
def test_gather_equals_gather_cohort(tmp_path, max_examples):
  store = _build(tmp_path)
  arrays = store.to_arrays()
  ds = ArrayDataset(x=arrays['x'], y=arrays['y'],
                    client_id=arrays['client_id'], class_names=CLASSES)
  pool = cohort_lib.ClientPool.from_dataset(ds)
  for seed, ids in enumerate(([4, 0, 5], [1], [6, 5, 4, 3, 2, 1, 0])):
    key = jax.random.key(seed)
    want = cohort_lib.gather_cohort(ds, ids, max_examples, key, pool)
    got = store.gather(ids, max_examples, key)
    assert set(got) == set(want)
    for name in want:
      assert got[name].dtype == want[name].dtype
      np.testing.assert_array_equal(got[name], want[name])


def test_sampled_cohort_gathers_like_gather_cohort(tmp_path):
  store = _build(tmp_path)
  ids = cohort_lib.sample_clients(jax.random.key(3), store.sizes, 4)
  arrays = store.to_arrays()
  ds = ArrayDataset(x=arrays['x'], y=arrays['y'],
                    client_id=arrays['client_id'], class_names=CLASSES)
  want = cohort_lib.gather_cohort(ds, ids, 2, jax.random.key(5))
  got = store.gather(ids, 2, jax.random.key(5))
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_gather_reads_only_the_cohorts_shards(tmp_path):
  store = _build(tmp_path)
  # Shards 1 and 2 vanish after opening: a cohort of shard 0 never maps them.
  shutil.rmtree(os.path.join(tmp_path, 'shard_00001'))
  shutil.rmtree(os.path.join(tmp_path, 'shard_00002'))
  cohort = store.gather([0, 2], 3, jax.random.key(0))
  assert cohort['mask'].sum(axis=1).tolist() == [2.0, 1.0]
  with pytest.raises(FileNotFoundError):
    store.gather([3], 3, jax.random.key(0))


def test_bad_cohorts_are_refused(tmp_path):
  store = _build(tmp_path)
  with pytest.raises(ValueError, match='larger than the population of 7'):
    store.gather(np.arange(8), 2, jax.random.key(0))
  with pytest.raises(ValueError, match='repeat a client'):
    store.gather([1, 1], 2, jax.random.key(0))
  with pytest.raises(ValueError, match=r'must lie in \[0, 7\)'):
    store.gather([7], 2, jax.random.key(0))
  with pytest.raises(ValueError, match='max_examples'):
    store.gather([0], 0, jax.random.key(0))


class _Interrupt(Exception):
  pass


def test_interrupted_build_resumes_without_rewriting(tmp_path):
  calls = []

  def failing(index):
    calls.append(index)
    if index == 2:
      raise _Interrupt()
    return _make_shard(index)

  with pytest.raises(_Interrupt):
    _build(tmp_path, failing)
  with pytest.raises(client_store.StoreError,
                     match='incomplete: 2 of 3 shards.*resume'):
    client_store.open_store(str(tmp_path))
  mtime = os.path.getmtime(os.path.join(tmp_path, 'shard_00000', 'x.npy'))
  calls.clear()
  store = _build(tmp_path, _counting(calls))
  assert calls == [2]  # Shards 0 and 1 were kept, only shard 2 written.
  assert os.path.getmtime(
      os.path.join(tmp_path, 'shard_00000', 'x.npy')) == mtime
  assert store.sizes.tolist() == [2, 5, 1, 3, 7, 4, 1]
  reference = _build(tmp_path / 'fresh')
  for name, want in reference.gather(range(7), 4, jax.random.key(1)).items():
    np.testing.assert_array_equal(
        store.gather(range(7), 4, jax.random.key(1))[name], want)


def _counting(calls):
  def make(index):
    calls.append(index)
    return _make_shard(index)
  return make


def test_leftover_temporary_shard_is_discarded(tmp_path):
  _build(tmp_path)
  manifest = json.loads((tmp_path / 'manifest.json').read_text())
  # Simulate a crash after shard 2 was renamed in but before it was listed.
  del manifest['shards']['2']
  manifest['complete'] = False
  (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
  os.makedirs(tmp_path / 'shard_00000.tmp')
  calls = []
  store = _build(tmp_path, _counting(calls))
  assert calls == [2]
  assert store.num_clients == 7
  assert not os.path.exists(tmp_path / 'shard_00000.tmp')


def test_corrupt_shard_is_refused_then_rebuilt(tmp_path):
  _build(tmp_path)
  path = tmp_path / 'shard_00001' / 'x.npy'
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))
  client_store.open_store(str(tmp_path))  # Sizes match: only checksums see it.
  with pytest.raises(client_store.StoreError, match='shard_00001.*SHA-256'):
    client_store.open_store(str(tmp_path), verify=True)
  with pytest.raises(client_store.StoreError,
                     match='Shard 1 .* damaged.*rebuild_damaged=True'):
    _build(tmp_path)
  calls = []
  store = _build(tmp_path, _counting(calls), rebuild_damaged=True)
  assert calls == [1]
  assert os.path.exists(tmp_path / 'shard_00001.damaged')  # Kept, not lost.
  client_store.open_store(str(tmp_path), verify=True)
  assert store.sizes.tolist() == [2, 5, 1, 3, 7, 4, 1]


def test_truncated_file_and_bad_manifest_are_refused(tmp_path):
  _build(tmp_path)
  path = tmp_path / 'shard_00002' / 'y.npy'
  path.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(client_store.StoreError, match='y.npy has .* bytes'):
    client_store.open_store(str(tmp_path))
  (tmp_path / 'manifest.json').write_text('{"format": ')
  with pytest.raises(client_store.StoreError, match='not valid JSON'):
    client_store.open_store(str(tmp_path))
  with pytest.raises(client_store.StoreError, match='No client store'):
    client_store.open_store(str(tmp_path / 'nothing'))


def test_resume_with_other_arguments_is_refused(tmp_path):
  _build(tmp_path)
  with pytest.raises(client_store.StoreError, match='different quantizer'):
    _build(tmp_path, quantizer=_quantizer('uint8'))


def test_shard_with_wrong_feature_shape_is_refused(tmp_path):
  def bad(index):
    del index
    return [{'x': np.zeros((2, 3, 5)), 'y': np.zeros(2), 'id': 0}]

  with pytest.raises(ValueError, match=r'x \(2, 3, 5\).*x \[n, 3, 4\]'):
    _build(tmp_path, bad)


def test_gather_of_a_part_with_positions_equals_the_whole(tmp_path):
  store = _build(tmp_path)
  ids, key = [0, 1, 3, 4], jax.random.key(7)
  whole = store.gather(ids, 2, key)
  part = store.gather(ids[2:], 2, key, positions=[2, 3])
  for name in whole:
    np.testing.assert_array_equal(part[name], whole[name][2:])
  with pytest.raises(ValueError, match='positions has shape'):
    store.gather(ids, 2, key, positions=[0])


def test_synthetic_store_is_deterministic(tmp_path):
  a = client_store.synthetic_store(str(tmp_path / 'a'), 7, feature_shape=(5, 4),
                                   clients_per_shard=3)
  b = client_store.synthetic_store(str(tmp_path / 'b'), 7, feature_shape=(5, 4),
                                   clients_per_shard=2)
  assert a.num_clients == b.num_clients == 7
  np.testing.assert_array_equal(a.sizes, b.sizes)
  assert set(a.sizes.tolist()) <= set(range(2, 7))
  for name, want in a.gather(range(7), 3, jax.random.key(0)).items():
    np.testing.assert_array_equal(b.gather(range(7), 3, jax.random.key(0))[name],
                                  want)


def test_sample_is_uniform_without_replacement(tmp_path):
  store = _build(tmp_path)
  counts = np.zeros(7)
  pairs = np.zeros((7, 7))
  draws = 3000
  for seed in range(draws):
    ids = store.sample(jax.random.key(seed), 3)
    assert ids.dtype == np.int32 and len(set(ids.tolist())) == 3
    assert ids.tolist() == sorted(ids.tolist()) and 0 <= ids.min()
    assert ids.max() < 7
    counts[ids] += 1
    pairs[ids[:, None], ids[None, :]] += 1
  # Each client is in a cohort with probability 3/7, each pair 3/7 * 2/6
  # (binomial standard deviations: ~27 and ~20 draws of 3000).
  np.testing.assert_allclose(counts, draws * 3 / 7, atol=5 * 27)
  off_diagonal = pairs[~np.eye(7, dtype=bool)]
  np.testing.assert_allclose(off_diagonal, draws * 3 / 7 * 2 / 6, atol=5 * 20)
  np.testing.assert_array_equal(store.sample(jax.random.key(1), 3),
                                store.sample(jax.random.key(1), 3))
  assert store.sample(jax.random.key(2), 7).tolist() == list(range(7))
  with pytest.raises(ValueError, match='population of 7'):
    store.sample(jax.random.key(0), 8)
  with pytest.raises(ValueError, match=r'\[1, 7\]'):
    store.sample(jax.random.key(0), 0)


def test_first_is_a_view_of_the_leading_clients(tmp_path):
  store = _build(tmp_path)  # Pool sizes 2, 5, 1, 3, 7, 4, 1.
  view = store.first(4)
  assert view.num_clients == 4 and view.num_examples == 2 + 5 + 1 + 3
  assert view.sizes.tolist() == [2, 5, 1, 3]
  assert store.num_clients == 7  # The store itself is unchanged.
  key = jax.random.key(1)
  assert max(view.sample(key, 4).tolist()) == 3
  np.testing.assert_array_equal(view.gather([3, 0], 4, key)['x'],
                                store.gather([3, 0], 4, key)['x'])
  with pytest.raises(ValueError, match=r'must lie in \[0, 4\)'):
    view.gather([4], 4, key)
  with pytest.raises(ValueError, match='1 <= num_clients <= 7'):
    store.first(8)


def test_to_arrays_of_some_clients_reads_only_those(tmp_path):
  store = _build(tmp_path)
  part = store.to_arrays([5, 6])
  assert part['client_id'].tolist() == [5, 5, 5, 5, 6]
  whole = store.to_arrays()
  keep = whole['client_id'] >= 5
  np.testing.assert_array_equal(part['x'], whole['x'][keep])
  np.testing.assert_array_equal(part['y'], whole['y'][keep])
