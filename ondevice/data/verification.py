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
from typing import NamedTuple

import numpy as np

from ondevice import options
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


def part_sizes(num_utterances: int, warmup_fraction: float,
               test_fraction: float) -> tuple[int, int, int]:
  """(train, warm-up, test) counts of a user with `num_utterances`."""
  n_test = round(test_fraction * num_utterances)
  n_warm = round(warmup_fraction * num_utterances)
  return num_utterances - n_test - n_warm, n_warm, n_test


def _check_fractions(warmup_fraction: float, test_fraction: float) -> None:
  for name, value in (('warmup_fraction', warmup_fraction),
                      ('test_fraction', test_fraction)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        not 0.0 < value < 1.0):
      raise ValueError(f'config.split.{name} must lie in (0, 1); got '
                       f'{value!r}.')
  if warmup_fraction + test_fraction >= 1.0:
    raise ValueError('config.split.warmup_fraction + test_fraction must be '
                     f'< 1 to leave training utterances; got '
                     f'{warmup_fraction} + {test_fraction}.')


def split_utterances(ds: ArrayDataset, warmup_fraction: float,
                     test_fraction: float, seed: int
                     ) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
  """Splits every user's utterances into (train, warm-up, test).

  User u's n_u utterances are shuffled by `default_rng((seed, u))`; the first
  round(test_fraction * n_u) go to test, the next round(warmup_fraction *
  n_u) to warm-up, the rest to train (`part_sizes`). Each part keeps dataset
  order.

  Raises:
    ValueError: for fractions outside (0, 1) or summing to >= 1, or a user
      left with no utterance in a part.
  """
  _check_fractions(warmup_fraction, test_fraction)
  part = np.zeros(len(ds), np.int8)  # 0 train, 1 warm-up, 2 test.
  for u in np.unique(ds.client_id):
    index = np.flatnonzero(ds.client_id == u)
    order = np.random.default_rng((seed, int(u))).permutation(index)
    sizes = part_sizes(len(index), warmup_fraction, test_fraction)
    _, n_warm, n_test = sizes
    if min(sizes) < 1:
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


class SplitSizes(NamedTuple):
  """How many users and utterances a config's splits will hold."""
  num_users: int           # Seen speakers (the clients).
  num_unseen: int          # Held-out speakers (impostors only).
  train_per_user: int
  warmup_per_user: int
  test_per_user: int

  @property
  def num_train(self) -> int:
    return self.num_users * self.train_per_user


def _held_out_speakers(num_speakers: int, test_fraction: float) -> int:
  # The rule of `base.split_by_client`, which every speaker enters.
  return min(num_speakers - 1, max(1, round(test_fraction * num_speakers)))


def check_config(config) -> SplitSizes:
  """Checks `config.data`, `config.split` and `config.features` unloaded.

  Every synthesised speaker has `utterances_per_word` clips of every word,
  so the sizes of the splits follow from the config alone.

  Raises:
    ValueError: naming the key of a missing or bad value.
  """
  from ondevice.data import speech_keywords  # pylint: disable=g-import-not-at-top
  options.require(config, ('data.name', 'split.warmup_fraction',
                           'split.test_fraction', 'split.seed'))
  registry.validate_data_config(config.data)
  options.one_of(config, 'data.name', ['speech_keywords'])
  options.one_of(config, 'features', FEATURES)
  _check_fractions(config.split.warmup_fraction, config.split.test_fraction)
  words = tuple(config.data.get('words', None) or speech_keywords.WORDS)
  unknown = sorted(set(words) - set(speech_keywords.WORDS))
  if unknown:
    raise ValueError(f'config.data.words has unknown words {unknown}; choose '
                     f'from {speech_keywords.WORDS}.')
  per_user = config.data.utterances_per_word * len(words)
  sizes = part_sizes(per_user, config.split.warmup_fraction,
                     config.split.test_fraction)
  if min(sizes) < 1:
    raise ValueError(
        f'config.data.utterances_per_word={config.data.utterances_per_word} '
        f'gives each user {per_user} utterances, split (train, warm-up, '
        f'test) = {sizes} by config.split; every part needs >= 1: raise '
        'utterances_per_word or change the split fractions.')
  num_unseen = _held_out_speakers(config.data.num_speakers,
                                  config.data.test_fraction)
  return SplitSizes(config.data.num_speakers - num_unseen, num_unseen,
                    *sizes)


def load_verification_splits(config) -> VerificationSplits:
  """Loads the corpus named by `config.data` and splits it for verification.

  Args:
    config: a ConfigDict with `data` (see `registry.load_dataset`, with
      `test_fraction` the fraction of *unseen* speakers) and `split` with
      `warmup_fraction`, `test_fraction` (of each seen user's utterances)
      and `seed`; `features` in FEATURES.
  """
  check_config(config)
  features = config.features
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
