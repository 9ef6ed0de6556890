"""Stream composition, time order, determinism, drift and user splits."""
import jax
import numpy as np
import pytest

from continual import streams


def _pools(sizes=(40, 12, 20, 15)):
  """Pools whose clips carry their own identity in x[:, 0, 0]."""
  pools, start = {}, 0
  for name, size in zip(streams.SOURCES, sizes):
    ids = np.arange(start, start + size)
    x = np.zeros((size, 4, 3), np.float32)
    x[:, 0, 0] = ids
    label = (ids % 5 if name in ('user_keyword', 'other_speaker') else
             np.full(size, streams.NO_KEYWORD))
    pools[name] = (x, label.astype(np.int32))
    start += size
  return pools


def test_source_counts_round_to_the_length():
  np.testing.assert_array_equal(streams.source_counts(10, (0.5, 0.15, 0.2,
                                                           0.15)),
                                [5, 2, 2, 1])  # 1.5 and 1.5 tie: first wins.
  assert streams.source_counts(864, streams.DEFAULT_MIX).sum() == 864
  with pytest.raises(ValueError, match='non-negative'):
    streams.source_counts(10, (1.0, -1.0, 0.0, 0.0))


def test_stream_is_a_deterministic_shuffle_of_the_pools():
  pools = _pools()
  a = streams.make_stream(pools, 60, jax.random.key(0))
  b = streams.make_stream(pools, 60, jax.random.key(0))
  c = streams.make_stream(pools, 60, jax.random.key(1))
  np.testing.assert_array_equal(a.x, b.x)
  np.testing.assert_array_equal(a.source, b.source)
  assert not np.array_equal(a.x, c.x)
  np.testing.assert_array_equal(np.bincount(a.source, minlength=4),
                                streams.source_counts(60, streams.DEFAULT_MIX))
  # Time runs forward in equal steps over [0, 1).
  np.testing.assert_allclose(a.time, np.arange(60) / 60)
  # Each clip keeps its own label and source, and none is drawn twice.
  ids = a.x[:, 0, 0].astype(int)
  assert len(set(ids)) == 60
  offsets = np.cumsum([0, 40, 12, 20])
  for clip_id, label, source in zip(ids, a.label, a.source):
    name = streams.SOURCES[source]
    x, pool_label = pools[name]
    assert label == pool_label[clip_id - offsets[source]]
  # The sources are mixed over time, not in blocks.
  first_half = np.bincount(a.source[:30], minlength=4)
  assert (first_half > 0).sum() >= 3


def test_chunks_cover_the_stream_in_order():
  s = streams.make_stream(_pools(), 50, jax.random.key(2))
  parts = list(s.chunks(16))
  assert [len(p) for p in parts] == [16, 16, 16, 2]
  np.testing.assert_array_equal(np.concatenate([p.time for p in parts]),
                                s.time)


def test_pool_too_small_or_missing_raises():
  with pytest.raises(ValueError, match='synthesise more'):
    streams.make_stream(_pools((5, 12, 20, 15)), 60, jax.random.key(0))
  pools = _pools()
  del pools['noise']
  with pytest.raises(ValueError, match="'noise'"):
    streams.make_stream(pools, 60, jax.random.key(0))


def test_drift_level_ramps_after_start():
  drift = streams.DriftConfig('noise', start=0.5)
  np.testing.assert_allclose(
      streams.drift_level(np.array([0.0, 0.5, 0.75, 1.0]), drift),
      [0.0, 0.0, 0.5, 1.0])
  assert not streams.drift_level(np.array([0.9]),
                                 streams.DriftConfig()).any()
  with pytest.raises(ValueError, match='Unknown drift'):
    streams.DriftConfig('reverb')


def test_noise_drift_adds_mel_energy_exactly():
  rng = np.random.default_rng(0)
  raw = rng.normal(size=(3, 6, 4)).astype(np.float32)
  drift = streams.DriftConfig('noise', snr_db=10.0)
  level = np.array([0.0, 0.5, 1.0], np.float32)
  out = streams.drift_raw_features(raw, level, drift)
  energy = np.exp(raw)
  # n = level * 10^(-10/10) * mean energy of the clip, added to every cell.
  added = np.exp(out) - energy
  want = level[:, None, None] * 0.1 * energy.mean(axis=(1, 2),
                                                  keepdims=True)
  np.testing.assert_allclose(added, np.broadcast_to(want, added.shape),
                             rtol=1e-4, atol=1e-6)


def test_speed_drift_compresses_time_around_the_centre():
  raw = np.zeros((2, 9, 2), np.float32)
  raw[:, :, 0] = np.arange(9)  # A ramp in band 0.
  raw[:, :, 1] = 5.0
  drift = streams.DriftConfig('speed', rate=2.0)
  out = streams.drift_raw_features(raw, np.array([0.0, 1.0]), drift)
  np.testing.assert_array_equal(out[0], raw[0])  # Level 0: untouched.
  # Frame i reads position 4 + 2 (i - 4): the centre stays, the ramp is
  # twice as steep, and frames past the ends take the 5th-percentile floor.
  floor = np.percentile(np.arange(9), 5)
  want = [floor, floor, 0, 2, 4, 6, 8, floor, floor]
  np.testing.assert_allclose(out[1, :, 0], want)
  np.testing.assert_allclose(out[1, :, 1], 5.0)


def test_apply_drift_round_trips_normalisation():
  rng = np.random.default_rng(1)
  mean, std = rng.normal(size=4), rng.uniform(1, 2, size=4)
  x = rng.normal(size=(2, 5, 4)).astype(np.float32)
  drift = streams.DriftConfig('noise')
  np.testing.assert_allclose(
      streams.apply_drift(x, np.zeros(2), drift, mean, std), x, atol=1e-5)
  assert streams.apply_drift(x, np.ones(2), streams.DriftConfig(), mean,
                             std) is x


def test_split_user_by_utterance():
  utt = np.tile(np.arange(6), 3)
  y = np.repeat(np.arange(3), 6)
  x = np.arange(18)[:, None].astype(np.float32)
  split = streams.split_user(x, y, utt, num_enroll=2, num_test=1)
  assert (len(split.enroll_x), len(split.test_x), len(split.stream_x)) == (
      6, 3, 9)
  np.testing.assert_array_equal(np.sort(split.enroll_y), [0, 0, 1, 1, 2, 2])
  with pytest.raises(ValueError, match='utterances per word'):
    streams.split_user(x, y, utt, num_enroll=3, num_test=3)
