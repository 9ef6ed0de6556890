"""A user's unlabelled audio stream after enrollment, ordered in time.

After enrolling, a device keeps hearing its user. What reaches the keyword
classifier (after voice-activity gating) is a mix of four sources:

  user_keyword     the user saying a keyword (the clips worth learning from),
  user_other_word  the user saying an out-of-vocabulary word,
  other_speaker    someone else speaking a keyword (family, TV),
  noise            background noise alone,

in proportions `DEFAULT_MIX`, shuffled into one time order by an explicit
PRNG key. Labels travel with the stream as hidden truth (-1 for clips that
contain no keyword) and are only read to score pseudo-labels.

Drift (optional) changes the acoustics as time goes on, from no change
before `start` to full strength at the end of the stream. Both kinds act on
raw log-mel features, log(mel + offset), so that no waveform is needed:

  noise  adds stationary noise with a flat mel spectrum: mel energies of
         independent signals add in expectation, so
         log-mel' = log(exp(log-mel) + n), n = level * mean mel energy of the
         clip * 10^(-snr_db / 10). At full strength the SNR is `snr_db`.
  speed  speaks faster (tempo, not pitch) by resampling the frames around the
         clip's centre by factor 1 + level * (rate - 1); frames that fall
         outside the clip take the clip's background floor (its per-band
         5th percentile).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import jax
import numpy as np

SOURCES = ('user_keyword', 'user_other_word', 'other_speaker', 'noise')
DEFAULT_MIX = (0.5, 0.15, 0.2, 0.15)
DRIFTS = ('none', 'noise', 'speed')
NO_KEYWORD = -1


@dataclasses.dataclass(frozen=True)
class DriftConfig:
  """How the acoustics change over the stream.

  Attributes:
    kind: one of DRIFTS.
    start: stream position in [0, 1) where the drift begins.
    snr_db: SNR of the added noise at full strength ('noise').
    rate: tempo factor at full strength ('speed'), e.g. 1.3.
  """
  kind: str = 'none'
  start: float = 0.5
  snr_db: float = 5.0
  rate: float = 1.3

  def __post_init__(self):
    if self.kind not in DRIFTS:
      raise ValueError(f'Unknown drift {self.kind!r}; choose one of {DRIFTS}.')
    if not 0.0 <= self.start < 1.0:
      raise ValueError(f'drift start must lie in [0, 1); got {self.start}.')
    if self.rate <= 0.0:
      raise ValueError(f'drift rate must be > 0; got {self.rate}.')


@dataclasses.dataclass(frozen=True)
class Stream:
  """Clips in time order.

  Attributes:
    x: normalised features [N, ...], drift applied.
    label: hidden word index, NO_KEYWORD for clips without a keyword.
    source: index into SOURCES.
    time: position in [0, 1).
    drift: drift level in [0, 1] applied to each clip.
  """
  x: np.ndarray
  label: np.ndarray
  source: np.ndarray
  time: np.ndarray
  drift: np.ndarray

  def __len__(self) -> int:
    return len(self.x)

  def chunks(self, chunk_size: int) -> Iterator['Stream']:
    """Consecutive pieces of `chunk_size` clips (the last may be shorter)."""
    if chunk_size < 1:
      raise ValueError(f'chunk_size must be >= 1; got {chunk_size}.')
    for start in range(0, len(self), chunk_size):
      part = slice(start, start + chunk_size)
      yield Stream(self.x[part], self.label[part], self.source[part],
                   self.time[part], self.drift[part])


def drift_level(time: np.ndarray, drift: DriftConfig) -> np.ndarray:
  """0 before drift.start, rising linearly to 1 at the end of the stream."""
  if drift.kind == 'none':
    return np.zeros_like(np.asarray(time, np.float32))
  ramp = (np.asarray(time, np.float32) - drift.start) / (1.0 - drift.start)
  return np.clip(ramp, 0.0, 1.0).astype(np.float32)


def drift_raw_features(raw: np.ndarray, level: np.ndarray,
                       drift: DriftConfig) -> np.ndarray:
  """Applies `drift` at per-clip `level` to raw log-mel clips [N, T, F]."""
  raw = np.asarray(raw, np.float32)
  level = np.broadcast_to(np.asarray(level, np.float32), raw.shape[:1])
  if drift.kind == 'none' or not np.any(level > 0):
    return raw
  if drift.kind == 'noise':
    energy = np.exp(raw)
    noise = (level[:, None, None] * 10.0 ** (-drift.snr_db / 10.0) *
             energy.mean(axis=(1, 2), keepdims=True))
    return np.log(energy + noise).astype(np.float32)
  out = raw.copy()
  frames = raw.shape[1]
  centre = (frames - 1) / 2.0
  grid = np.arange(frames, dtype=np.float32)
  for i in np.flatnonzero(level > 0):
    factor = 1.0 + level[i] * (drift.rate - 1.0)
    pos = centre + (grid - centre) * factor
    floor = np.percentile(raw[i], 5, axis=0)
    for band in range(raw.shape[2]):
      out[i, :, band] = np.interp(pos, grid, raw[i, :, band],
                                  left=floor[band], right=floor[band])
  return out


def apply_drift(x: np.ndarray, level: np.ndarray, drift: DriftConfig,
                mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Drift for normalised features: un-normalise, drift, normalise again."""
  if drift.kind == 'none':
    return x
  raw = np.asarray(x, np.float32) * std + mean
  return ((drift_raw_features(raw, level, drift) - mean) / std).astype(
      np.float32)


def host_rng(key: jax.Array) -> np.random.Generator:
  """A NumPy generator determined by a JAX key, for host-side sampling.

  Data preparation runs outside jit; drawing it with NumPy avoids compiling
  a JAX kernel for every new shape while staying a function of the key.
  """
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def source_counts(length: int, mix: tuple[float, ...]) -> np.ndarray:
  """Clips per source: largest-remainder rounding of length * mix."""
  mix = np.asarray(mix, np.float64)
  if mix.shape != (len(SOURCES),) or np.any(mix < 0) or mix.sum() <= 0:
    raise ValueError(f'mix must be {len(SOURCES)} non-negative weights for '
                     f'{SOURCES}; got {tuple(mix)}.')
  exact = length * mix / mix.sum()
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind='stable')
  counts[order[:length - counts.sum()]] += 1
  return counts


def make_stream(pools: Mapping[str, tuple[np.ndarray, np.ndarray]],
                length: int, key: jax.Array,
                mix: tuple[float, ...] = DEFAULT_MIX,
                drift: DriftConfig = DriftConfig(),
                feature_stats: tuple[np.ndarray, np.ndarray] | None = None
                ) -> Stream:
  """Draws `length` clips from the pools and orders them in time.

  Args:
    pools: {source name: (normalised x, label)} for every source with a
      positive weight; labels are NO_KEYWORD where there is no keyword.
    length: clips in the stream.
    key: PRNG key; the stream is a deterministic function of it.
    mix: weight of each source, in the order of SOURCES.
    drift: acoustic change over time.
    feature_stats: (mean, std) the features were normalised with; needed
      for drift.

  Returns:
    The stream; each pool contributes clips drawn without replacement.
  """
  counts = source_counts(length, mix)
  if drift.kind != 'none' and feature_stats is None:
    raise ValueError('Drift acts on raw log-mel: pass feature_stats=(mean, '
                     'std) used to normalise the pools.')
  rng = host_rng(key)
  xs, labels, sources = [], [], []
  for index, (name, count) in enumerate(zip(SOURCES, counts)):
    if count == 0:
      continue
    if name not in pools:
      raise ValueError(f'The mix gives {count} clips to {name!r} but pools '
                       f'has no such entry; pools has {sorted(pools)}.')
    x, label = pools[name]
    if len(x) < count:
      raise ValueError(f'Pool {name!r} has {len(x)} clips; the stream needs '
                       f'{count}. Lower the stream length or synthesise more '
                       'utterances.')
    pick = rng.choice(len(x), int(count), replace=False)
    xs.append(np.asarray(x)[pick])
    labels.append(np.asarray(label, np.int32)[pick])
    sources.append(np.full(count, index, np.int32))
  order = rng.permutation(length)
  time = np.arange(length, dtype=np.float32) / length
  x = np.concatenate(xs)[order]
  level = drift_level(time, drift)
  if drift.kind != 'none':
    x = apply_drift(x, level, drift, *feature_stats)
  return Stream(x=x.astype(np.float32), label=np.concatenate(labels)[order],
                source=np.concatenate(sources)[order], time=time, drift=level)


@dataclasses.dataclass(frozen=True)
class UserSplit:
  """One user's labelled clips, split by utterance index.

  enroll: the first K utterances of each keyword (labelled, for enrollment);
  test: the next T (held out, to measure the user's accuracy);
  stream: the rest (their labels are hidden truth only).
  """
  enroll_x: np.ndarray
  enroll_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  stream_x: np.ndarray
  stream_y: np.ndarray


def split_user(x: np.ndarray, y: np.ndarray, utterance: np.ndarray,
               num_enroll: int, num_test: int) -> UserSplit:
  """Splits a user's keyword clips by utterance index (see UserSplit)."""
  total = int(utterance.max()) + 1 if len(utterance) else 0
  if num_enroll < 1 or num_test < 1 or num_enroll + num_test >= total:
    raise ValueError(f'Need 1 <= num_enroll, 1 <= num_test and num_enroll + '
                     f'num_test < {total} utterances per word; got '
                     f'{num_enroll} and {num_test}.')
  enroll = utterance < num_enroll
  test = (utterance >= num_enroll) & (utterance < num_enroll + num_test)
  stream = utterance >= num_enroll + num_test
  return UserSplit(x[enroll], y[enroll], x[test], y[test], x[stream],
                   y[stream])
