"""Datasets chosen by name in a config: `load_dataset(config.data)`.

Returns (train, test) ArrayDatasets with features normalised by statistics of
the train split only. For speech keywords the test split holds whole speakers
that training never sees ("held-out speakers").
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ondevice.data.base import ArrayDataset, split_by_client

DATASETS = ('speech_keywords', 'fashion_mnist')


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


def load_dataset(data_config) -> tuple[ArrayDataset, ArrayDataset]:
  """Loads the dataset named by `data_config.name`.

  Args:
    data_config: ConfigDict with `name` and the dataset's own fields:
      speech_keywords: num_speakers, utterances_per_word, corpus_seed,
        test_fraction, split_seed, cache_dir (optional), words (optional).
      fashion_mnist: data_dir (optional), max_train (optional, 0 = all).

  Raises:
    ValueError: unknown name or invalid field, naming the config key.
  """
  name = data_config.name
  if name == 'speech_keywords':
    return _load_speech_keywords(data_config)
  if name == 'fashion_mnist':
    return _load_fashion_mnist(data_config)
  raise ValueError(f'config.data.name={name!r} is unknown; choose one of '
                   f'{DATASETS}.')


def _load_speech_keywords(cfg) -> tuple[ArrayDataset, ArrayDataset]:
  from ondevice.data import speech_keywords  # pylint: disable=g-import-not-at-top
  if cfg.num_speakers < 2:
    raise ValueError('config.data.num_speakers must be >= 2 (train and test '
                     f'speakers); got {cfg.num_speakers}.')
  if cfg.utterances_per_word < 1:
    raise ValueError('config.data.utterances_per_word must be >= 1; got '
                     f'{cfg.utterances_per_word}.')
  kwargs = dict(num_speakers=cfg.num_speakers,
                utterances_per_word=cfg.utterances_per_word,
                seed=cfg.corpus_seed)
  words = cfg.get('words', None)
  if words:
    kwargs['words'] = tuple(words)
  corpus = speech_keywords.load_speech_keywords(
      speech_keywords.SpeechCorpusConfig(**kwargs),
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
  max_train = int(cfg.get('max_train', 0) or 0)
  if max_train < 0:
    raise ValueError(f'config.data.max_train must be >= 0; got {max_train}.')
  if max_train:
    train = train.take(np.arange(min(max_train, len(train))))
  max_test = int(cfg.get('max_test', 0) or 0)
  if max_test:
    test = test.take(np.arange(min(max_test, len(test))))
  return _normalise(train, test, axis=(0, 1, 2, 3))
