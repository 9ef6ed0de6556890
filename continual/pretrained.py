"""The global model every user starts from, and EWC's Fisher information.

Pre-training is `central.pretrain.pretrain` on `config.pretrain` (a
configs/kws_central.py config) in `<cache>/continual/pretrain_<hash>`, or in
`config.pretrain_dir` when set, so every continual-learning run with the same
pre-training reuses one finished run, and an interrupted pre-training
resumes. The diagonal Fisher information that EWC needs is computed once on
the pre-training data and cached beside the checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from central import pretrain
from central import supervised
from continual import objectives
from continual import regularizers
from ondevice import train
from ondevice.data import speech_keywords

PyTree = Any
Pretrained = pretrain.Pretrained


def _cache_dir(config: ml_collections.ConfigDict) -> str:
  cache = config.pretrain.data.get('cache_dir', '') or (
      speech_keywords.default_cache_dir())
  return os.path.join(cache, 'continual')


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                quant_kwargs: dict[str, Any] | None = None) -> nn.Module:
  """The pre-training model with the continual run's quant hooks."""
  return supervised.build_model(config.pretrain, num_classes,
                                quant_kwargs or {})


def load_pretrained(config: ml_collections.ConfigDict) -> Pretrained:
  """Pre-trains (or restores) the global model of `config.pretrain`."""
  return pretrain.pretrain(config.pretrain, _cache_dir(config),
                           workdir=config.get('pretrain_dir', '') or None)


def fisher(config: ml_collections.ConfigDict, pretrained: Pretrained,
           model: nn.Module) -> PyTree:
  """EWC's diagonal Fisher at the pre-trained params, cached as .npz.

  Args:
    config: a (variant) config whose regularizer.ewc.fisher_examples counts
      the pre-training clips the estimate averages over.
    pretrained: the pre-trained model and data.
    model: the module of `pretrained.params`.
  """
  count = min(int(config.regularizer.ewc.fisher_examples),
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

