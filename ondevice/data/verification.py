"""Speaker-verification splits of the synthesised speech-keyword corpus.

Every speaker is a user. The corpus is split twice:

* by speaker (`registry.load_dataset`'s held-out speakers): *seen* users
  train; *unseen* speakers never train and serve only as impostors;
* within each seen user, by utterance, into train, warm-up (where the user
  sets its own acceptance threshold) and test utterances.

Labels `y` of these datasets are user indices (0..num_users-1 for seen users,
0..num_unseen-1 for unseen speakers), the keyword moves to meta['word'], and
`client_id` is the user index, so that seen users are the clients of a
federated round. Trials are formed from the test utterances of seen users
(genuine when the claimed user is the speaker) and every utterance of unseen
speakers (always impostors); see `fedjax_ext.verification`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ondevice.data import registry
from ondevice.data.base import ArrayDataset


@dataclasses.dataclass(frozen=True)
class VerificationSplits:
  """Seen users' train / warm-up / test utterances, and unseen speakers.

  Attributes:
    train: seen users' training utterances; y = client_id = user index.
    warmup: seen users' warm-up utterances (threshold calibration).
    test: seen users' held-out utterances (genuine and impostor trials).
    unseen: every utterance of the unseen speakers; y = unseen index.
    speakers: corpus speaker id of each seen user.
    unseen_speakers: corpus speaker id of each unseen speaker.
  """
  train: ArrayDataset
  warmup: ArrayDataset
  test: ArrayDataset
  unseen: ArrayDataset
  speakers: np.ndarray
  unseen_speakers: np.ndarray

  @property
  def num_users(self) -> int:
    return len(self.speakers)


def relabel_by_speaker(ds: ArrayDataset) -> tuple[ArrayDataset, np.ndarray]:
  """y := client_id := dense speaker index; the word goes to meta['word']."""
  speakers, index = np.unique(ds.client_id, return_inverse=True)
  index = index.astype(np.int32)
  out = ArrayDataset(
      x=ds.x, y=index, client_id=index,
      class_names=tuple(f'speaker_{s}' for s in speakers),
      meta={**ds.meta, 'word': ds.y.astype(np.int32),
            'speaker': ds.client_id.astype(np.int32)},
      info=dict(ds.info, word_names=ds.class_names))
  return out, speakers


def split_utterances(ds: ArrayDataset, warmup_fraction: float,
                     test_fraction: float, seed: int
                     ) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
  """Splits every user's utterances into (train, warm-up, test).

  User u's n_u utterances are shuffled by `default_rng((seed, u))`; the first
  round(test_fraction * n_u) go to test, the next round(warmup_fraction *
  n_u) to warm-up, the rest to train. Each part keeps dataset order.

  Raises:
    ValueError: for fractions outside [0, 1) or summing to >= 1, or a user
      left with no utterance in a part.
  """
  for name, value in (('warmup_fraction', warmup_fraction),
                      ('test_fraction', test_fraction)):
    if not 0.0 < value < 1.0:
      raise ValueError(f'config.split.{name} must lie in (0, 1); got '
                       f'{value}.')
  if warmup_fraction + test_fraction >= 1.0:
    raise ValueError('config.split.warmup_fraction + test_fraction must be '
                     f'< 1 to leave training utterances; got '
                     f'{warmup_fraction} + {test_fraction}.')
  part = np.zeros(len(ds), np.int8)  # 0 train, 1 warm-up, 2 test.
  for u in np.unique(ds.client_id):
    index = np.flatnonzero(ds.client_id == u)
    order = np.random.default_rng((seed, int(u))).permutation(index)
    n_test = round(test_fraction * len(index))
    n_warm = round(warmup_fraction * len(index))
    if min(n_test, n_warm, len(index) - n_test - n_warm) < 1:
      raise ValueError(
          f'User {u} has {len(index)} utterances: too few for a train / '
          f'warm-up / test split with fractions {warmup_fraction} and '
          f'{test_fraction}; use more utterances_per_word.')
    part[order[:n_test]] = 2
    part[order[n_test:n_test + n_warm]] = 1
  return ds.take(part == 0), ds.take(part == 1), ds.take(part == 2)


FEATURES = ('log_mel', 'log_mel_stats')


def log_mel_stats(ds: ArrayDataset) -> ArrayDataset:
  """[N, T, F] log-mel -> [N, 2F]: per-band mean and std over time.

  Statistics pooling over frames (as x-vectors pool frame features, Snyder
  et al. 2018) done on the input: a cheap utterance-level speaker feature.
  """
  if ds.x.ndim != 3:
    raise ValueError(f'log_mel_stats needs [N, time, freq] features; got '
                     f'shape {ds.x.shape}.')
  x = np.concatenate([ds.x.mean(axis=1), ds.x.std(axis=1)], axis=1)
  return dataclasses.replace(ds, x=x.astype(np.float32))


def load_verification_splits(config) -> VerificationSplits:
  """Loads the corpus named by `config.data` and splits it for verification.

  Args:
    config: a ConfigDict with `data` (see `registry.load_dataset`, with
      `test_fraction` the fraction of *unseen* speakers) and `split` with
      `warmup_fraction`, `test_fraction` (of each seen user's utterances)
      and `seed`; optional `features` in FEATURES (default 'log_mel').
  """
  if config.data.name != 'speech_keywords':
    raise ValueError('Speaker verification needs config.data.name='
                     f"'speech_keywords'; got {config.data.name!r}.")
  features = config.get('features', 'log_mel')
  if features not in FEATURES:
    raise ValueError(f'config.features={features!r} is unknown; choose one '
                     f'of {FEATURES}.')
  seen, unseen = registry.load_dataset(config.data)
  if features == 'log_mel_stats':
    seen, unseen = log_mel_stats(seen), log_mel_stats(unseen)
  seen, speakers = relabel_by_speaker(seen)
  unseen, unseen_speakers = relabel_by_speaker(unseen)
  train, warmup, test = split_utterances(
      seen, config.split.warmup_fraction, config.split.test_fraction,
      config.split.seed)
  return VerificationSplits(train=train, warmup=warmup, test=test,
                            unseen=unseen, speakers=speakers,
                            unseen_speakers=unseen_speakers)
