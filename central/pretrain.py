"""The global model a study starts from: pre-trained once, then cached.

Few-shot personalisation, continual learning and the sparse-update study all
begin from a model trained centrally on many speakers. `pretrain` trains it
with `central.supervised` in a work directory named by a hash of the config
section that describes it (and of the datasets, when the caller passes its
own), so every run with the same pre-training reuses one finished run, and an
interrupted pre-training resumes from its checkpoint.

    glob = pretrain.pretrain(config.pretrain, cache_dir=workdir)
    glob.params, glob.model_state, glob.model      # float params
    glob.train_ds, glob.test_ds, glob.feature_stats
    glob.metrics, glob.workdir, glob.reused        # reused: no training ran

API:
  `pretrain(section, cache_dir, *, datasets=None, workdir=None,
  model_kwargs=None, trainable=None) -> Pretrained`
    `section`: a complete `central.supervised` config (data, model, norm,
      model_kwargs, quant, optimiser, num_steps, seed, ...), e.g.
      `configs/kws_central.get_config()`. Its quant mode applies.
    `cache_dir`: where `pretrain_<hash>` directories go.
    `datasets`: (train, test) to train on instead of loading
      `section.data`; their contents enter the hash.
    `workdir`: use this directory instead of `cache_dir/pretrain_<hash>`.
    `model_kwargs`, `trainable`: passed to `supervised.train_and_evaluate`;
      the caller must keep them a function of `section` (they are not
      hashed).
  `pretrain_dir(section, cache_dir, datasets=None) -> str`: the directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import ml_collections
import numpy as np

from central import supervised
from ondevice.data import registry
from ondevice.data.base import ArrayDataset

PyTree = Any
Datasets = tuple[ArrayDataset, ArrayDataset]


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """The pre-trained model and the data it was trained and tested on.

  Attributes:
    params, model_state: the model's variables after the last step.
    model: the module they belong to (with the section's quant hooks).
    train_ds, test_ds: the (normalised) data of the run.
    metrics: the run's final_metrics.json.
    workdir: the run's directory.
    reused: True when a finished run was restored without training.
  """
  params: PyTree
  model_state: PyTree
  model: nn.Module
  train_ds: ArrayDataset
  test_ds: ArrayDataset
  metrics: dict[str, Any]
  workdir: str
  reused: bool

  @property
  def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) that normalised the features (per mel band for speech)."""
    return (np.asarray(self.train_ds.info['feature_mean'], np.float32),
            np.asarray(self.train_ds.info['feature_std'], np.float32))


def _fingerprint(datasets: Datasets) -> str:
  """A digest of both splits: shapes, labels, clients and strided rows."""
  digest = hashlib.sha256()
  for ds in datasets:
    digest.update(repr((ds.x.shape, str(ds.x.dtype), ds.class_names)).encode())
    digest.update(np.ascontiguousarray(ds.y).tobytes())
    digest.update(np.ascontiguousarray(ds.client_id).tobytes())
    stride = max(1, len(ds) // 64)
    digest.update(np.ascontiguousarray(ds.x[::stride]).tobytes())
  return digest.hexdigest()


def pretrain_dir(section: ml_collections.ConfigDict, cache_dir: str,
                 datasets: Datasets | None = None) -> str:
  """`cache_dir/pretrain_<hash of section (and datasets)>`."""
  key = section.to_json(sort_keys=True)
  if datasets is not None:
    key += _fingerprint(datasets)
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return os.path.join(cache_dir, f'pretrain_{digest}')


def pretrain(section: ml_collections.ConfigDict, cache_dir: str, *,
             datasets: Datasets | None = None, workdir: str | None = None,
             model_kwargs: Mapping[str, Any] | None = None,
             trainable: Any = None) -> Pretrained:
  """Trains (or resumes, or reuses) the global model `section` describes."""
  supervised.validate_config(section)
  workdir = workdir or pretrain_dir(section, cache_dir, datasets)
  datasets = datasets or registry.load_dataset(section.data)
  reused = supervised.is_finished(workdir)
  logging.info('%s the global model in %s.',
               'Reusing' if reused else 'Pre-training', workdir)
  run = supervised.restore if reused else supervised.train_and_evaluate
  out = run(section, workdir, datasets=datasets, model_kwargs=model_kwargs,
            trainable=trainable)
  state = out['state']
  return Pretrained(params=state.params, model_state=dict(state.model_state),
                    model=out['model'], train_ds=datasets[0], test_ds=datasets[1],
                    metrics=out['metrics'], workdir=workdir, reused=reused)
