"""Datasets chosen by name in a config: `load_dataset(config.data)`.

Returns (train, test) ArrayDatasets with features normalised by statistics of
the train split only. For speech keywords the test split holds whole speakers
that training never sees ("held-out speakers").

Offline datasets: 'speech_keywords' (the synthesised corpus) and
'fashion_mnist' (the Debian package). Public datasets through
tensorflow-datasets, for users with network access: 'tfds_speech_commands',
'tfds_emnist' and 'tfds_fashion_mnist' (fields: data_dir, config for EMNIST,
backend, train_split, test_split, max_train, max_test, download; see
`ondevice.data.tfds_loaders.load_tfds`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ondevice.data.base import ArrayDataset, split_by_client

TFDS_DATASETS = {'tfds_speech_commands': 'speech_commands',
                 'tfds_emnist': 'emnist',
                 'tfds_fashion_mnist': 'fashion_mnist'}
DATASETS = ('speech_keywords', 'fashion_mnist') + tuple(TFDS_DATASETS)
# Fields each dataset reads besides `name`, with their defaults.
_TFDS_FIELDS = dict(data_dir='', config='', backend='auto',
                    train_split='train', test_split='test', max_train=0,
                    max_test=0, download=True)
# Every field some dataset reads. A config may hold another dataset's fields
# (a locked config cannot drop them when --config.data.name switches), but a
# field no dataset reads is a typo.
_KNOWN_FIELDS = {'name', 'num_speakers', 'utterances_per_word', 'corpus_seed',
                 'test_fraction', 'split_seed', 'cache_dir', 'words',
                 'population', *_TFDS_FIELDS}


def _normalise(train: ArrayDataset, test: ArrayDataset,
               axis: tuple[int, ...]) -> tuple[ArrayDataset, ArrayDataset]:
  """Standardises features with the train split's mean/std over `axis`."""
  mean = train.x.mean(axis=axis, keepdims=True, dtype=np.float64)
  std = train.x.std(axis=axis, keepdims=True, dtype=np.float64) + 1e-6
  def apply(ds):
    x = ((ds.x - mean) / std).astype(np.float32)
    info = dict(ds.info, feature_mean=mean.squeeze(), feature_std=std.squeeze())
    return dataclasses.replace(ds, x=x, info=info)
  return apply(train), apply(test)


def validate_data_config(data_config) -> None:
  """Checks `config.data` without loading anything.

  Raises:
    ValueError: naming the key, for an unknown name (listing the valid ones)
      or a bad field.
  """
  name = data_config.get('name', None)
  if name not in DATASETS:
    raise ValueError(f'config.data.name={name!r} is unknown; choose one of '
                     f'{DATASETS}.')
  unknown = sorted(set(data_config) - _KNOWN_FIELDS)
  if unknown:
    raise ValueError(f'config.data has unknown fields {unknown}; valid: '
                     f'{sorted(_KNOWN_FIELDS)}.')
  for key in ('max_train', 'max_test'):
    value = data_config.get(key, 0) or 0
    if not isinstance(value, int) or value < 0:
      raise ValueError(f'config.data.{key} must be an int >= 0 (0 = all); '
                       f'got {value!r}.')
  if name == 'speech_keywords':
    _check_speech_keywords(data_config)
  if name in TFDS_DATASETS:
    _tfds_arguments(data_config)


def _check_speech_keywords(cfg) -> None:
  for key in ('num_speakers', 'utterances_per_word', 'corpus_seed',
              'test_fraction', 'split_seed'):
    if key not in cfg:
      raise ValueError(f'The config lacks config.data.{key} (speech_keywords '
                       'needs it).')
  if cfg.num_speakers < 2:
    raise ValueError('config.data.num_speakers must be >= 2 (train and test '
                     f'speakers); got {cfg.num_speakers}.')
  if cfg.utterances_per_word < 1:
    raise ValueError('config.data.utterances_per_word must be >= 1; got '
                     f'{cfg.utterances_per_word}.')
  if not 0 < cfg.test_fraction < 1:
    raise ValueError('config.data.test_fraction must be in (0, 1); got '
                     f'{cfg.test_fraction}.')
  # The speaker population (engines, voices, rooms) is checked here, so a
  # bad name or override fails before any clip is synthesised.
  from ondevice.data import population  # pylint: disable=g-import-not-at-top
  population.population_from_config(cfg.get('population', None),
                                    'config.data.population')


def _tfds_arguments(cfg) -> dict:
  """`load_tfds` keyword arguments of a tfds_* config, checked."""
  from ondevice.data import tfds_loaders  # pylint: disable=g-import-not-at-top
  args = {k: cfg.get(k, v) for k, v in _TFDS_FIELDS.items()}
  dataset = TFDS_DATASETS[cfg.name]
  try:
    tfds_loaders.check_arguments(dataset, args['config'] or None,
                                 args['backend'])
  except ValueError as e:
    key = 'backend' if 'backend' in str(e) else 'config'
    raise ValueError(f'config.data.{key}: {e}') from None
  return args


def load_dataset(data_config) -> tuple[ArrayDataset, ArrayDataset]:
  """Loads the dataset named by `data_config.name`.

  Args:
    data_config: ConfigDict with `name` and the dataset's own fields:
      speech_keywords: num_speakers, utterances_per_word, corpus_seed,
        test_fraction, split_seed, cache_dir (optional), words (optional),
        population (optional; `ondevice.data.population.NAMES` or a mapping
        of overrides, default 'espeak').
      fashion_mnist: data_dir (optional), max_train (optional, 0 = all).

  Raises:
    ValueError: unknown name or invalid field, naming the config key.
  """
  validate_data_config(data_config)
  name = data_config.name
  if name == 'speech_keywords':
    return _load_speech_keywords(data_config)
  if name == 'fashion_mnist':
    return _load_fashion_mnist(data_config)
  return _load_tfds(data_config)


def _first(ds: ArrayDataset, count: int) -> ArrayDataset:
  return ds.take(np.arange(min(count, len(ds)))) if count else ds


def _load_tfds(cfg) -> tuple[ArrayDataset, ArrayDataset]:
  from ondevice.data import tfds_loaders  # pylint: disable=g-import-not-at-top
  args = _tfds_arguments(cfg)
  load = lambda split: tfds_loaders.load_tfds(
      TFDS_DATASETS[cfg.name], split, args['data_dir'] or None,
      config=args['config'] or None, download=args['download'],
      backend=args['backend'])
  train = _first(load(args['train_split']), args['max_train'])
  test = _first(load(args['test_split']), args['max_test'])
  # Per frequency band for speech (as the offline corpus), one scalar for
  # images.
  axis = (0, 1) if train.x.ndim == 3 else (0, 1, 2, 3)
  return _normalise(train, test, axis=axis)


def _load_speech_keywords(cfg) -> tuple[ArrayDataset, ArrayDataset]:
  from ondevice.data import speech_keywords  # pylint: disable=g-import-not-at-top
  kwargs = dict(num_speakers=cfg.num_speakers,
                utterances_per_word=cfg.utterances_per_word,
                seed=cfg.corpus_seed)
  words = cfg.get('words', None)
  if words:
    kwargs['words'] = tuple(words)
  corpus = speech_keywords.load_corpus(
      speech_keywords.SpeechCorpusConfig(**kwargs),
      population=cfg.get('population', None),
      cache_dir=cfg.get('cache_dir', None) or None)
  train, test = split_by_client(corpus, cfg.test_fraction, cfg.split_seed)
  # Per mel band statistics: loudness differs by band, not by frame.
  return _normalise(train, test, axis=(0, 1))


def _load_fashion_mnist(cfg) -> tuple[ArrayDataset, ArrayDataset]:
  from ondevice.data import images  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if cfg.get('data_dir', None):
    kwargs['data_dir'] = cfg.data_dir
  train = images.load_fashion_mnist('train', **kwargs)
  test = images.load_fashion_mnist('test', **kwargs)
  train = _first(train, int(cfg.get('max_train', 0) or 0))
  test = _first(test, int(cfg.get('max_test', 0) or 0))
  return _normalise(train, test, axis=(0, 1, 2, 3))
