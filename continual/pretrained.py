"""The global model every user starts from: pre-trained once, then cached.

Pre-training is `ondevice.supervised.train_and_evaluate` on
`config.pretrain` (a configs/kws_central.py config) in a work directory named
by a hash of that config, so every continual-learning run with the same
pre-training reuses its checkpoint, and an interrupted pre-training resumes.
The diagonal Fisher information that EWC needs is computed once on the
pre-training data and cached beside the checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from continual import objectives
from continual import regularizers
from ondevice import supervised
from ondevice import train
from ondevice.data import registry
from ondevice.data import speech_keywords
from ondevice.data.base import ArrayDataset

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """The pre-trained model and the data it was trained and tested on."""
  params: PyTree
  model_state: PyTree
  train_ds: ArrayDataset
  test_ds: ArrayDataset
  metrics: dict[str, Any]
  workdir: str

  @property
  def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per mel band that normalised the features."""
    return (np.asarray(self.train_ds.info['feature_mean'], np.float32),
            np.asarray(self.train_ds.info['feature_std'], np.float32))


def pretrain_dir(config: ml_collections.ConfigDict) -> str:
  """config.pretrain_dir, or one named by a hash of config.pretrain."""
  if config.get('pretrain_dir', ''):
    return config.pretrain_dir
  key = config.pretrain.to_json(sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  cache = config.pretrain.data.get('cache_dir', '') or (
      speech_keywords.default_cache_dir())
  return os.path.join(cache, 'continual', f'pretrain_{digest}')


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                quant_kwargs: dict[str, Any] | None = None) -> nn.Module:
  return supervised.build_model(config.pretrain, num_classes,
                                quant_kwargs or {})


def load_pretrained(config: ml_collections.ConfigDict) -> Pretrained:
  """Pre-trains (or restores) the global model of `config.pretrain`."""
  workdir = pretrain_dir(config)
  datasets = registry.load_dataset(config.pretrain.data)
  done = os.path.exists(os.path.join(workdir, 'final_metrics.json'))
  logging.info('%s the global model in %s.',
               'Restoring' if done else 'Pre-training', workdir)
  out = supervised.train_and_evaluate(config.pretrain, workdir,
                                      datasets=datasets)
  state = out['state']
  return Pretrained(params=state.params, model_state=state.model_state,
                    train_ds=datasets[0], test_ds=datasets[1],
                    metrics=out['metrics'], workdir=workdir)


def fisher(config: ml_collections.ConfigDict, pretrained: Pretrained,
           model: nn.Module) -> PyTree:
  """EWC's diagonal Fisher at the pre-trained params, cached as .npz."""
  count = min(int(config.regularizer.fisher_examples),
              len(pretrained.train_ds))
  path = os.path.join(pretrained.workdir, f'fisher_{count}.npz')
  flat_params = train.flatten_params(pretrained.params)
  if os.path.exists(path):
    with np.load(path) as npz:
      stored = dict(npz)
    if sorted(stored) == sorted(flat_params):
      return train.unflatten_params(stored)
  key = jax.random.key(config.seed)
  pick_key, sample_key = jax.random.split(key)
  index = np.asarray(jax.random.choice(pick_key, len(pretrained.train_ds),
                                       (count,), replace=False))
  estimate = regularizers.fisher_diagonal(
      objectives.logits_fn(model), pretrained.params, pretrained.model_state,
      pretrained.train_ds.x[index], sample_key)
  flat = {k: np.asarray(v) for k, v in train.flatten_params(estimate).items()}
  os.makedirs(pretrained.workdir, exist_ok=True)
  np.savez(path, **flat)
  with open(os.path.join(pretrained.workdir, 'fisher.json'), 'w') as f:
    json.dump({'examples': count,
               'mean': {k: float(v.mean()) for k, v in flat.items()}}, f,
              indent=2)
  return estimate

