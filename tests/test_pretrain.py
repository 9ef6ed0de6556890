"""Tests of central/pretrain.py: one cached global model per config section."""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from central import pretrain
from central import supervised
from ondevice.data.base import ArrayDataset


def _datasets(seed=0, n=48):
  rng = np.random.default_rng(seed)
  def split(m):
    y = rng.integers(0, 3, m).astype(np.int32)
    x = rng.normal(size=(m, 6, 4)).astype(np.float32) + y[:, None, None]
    return ArrayDataset(x=x, y=y, client_id=np.zeros(m, np.int32),
                        class_names=('a', 'b', 'c'),
                        info={'feature_mean': np.zeros(4),
                              'feature_std': np.ones(4)})
  return split(n), split(16)


def _section(**overrides):
  c = ml_collections.ConfigDict(dict(
      data=dict(name='fashion_mnist', max_train=0, max_test=0),
      model='mlp', model_kwargs={'hidden': (8,)}, norm='none', quant='none',
      optimizer='adam', learning_rate=1e-2, schedule='constant',
      batch_size=8, eval_batch_size=16, num_steps=6, log_every=3,
      eval_every=6, checkpoint_every=3, seed=0))
  c.update(overrides)
  return c


def test_second_call_reuses_the_finished_run_without_training(tmp_path,
                                                             monkeypatch):
  data = _datasets()
  first = pretrain.pretrain(_section(), str(tmp_path), datasets=data)
  assert not first.reused and first.metrics['steps'] == 6
  assert first.workdir == pretrain.pretrain_dir(_section(), str(tmp_path),
                                                data)

  def no_training(*args, **kwargs):
    raise AssertionError('the cached run trained again')
  monkeypatch.setattr(supervised, 'train_and_evaluate', no_training)
  second = pretrain.pretrain(_section(), str(tmp_path), datasets=data)
  assert second.reused and second.workdir == first.workdir
  assert second.metrics == first.metrics
  jax.tree.map(np.testing.assert_array_equal, second.params, first.params)
  # The params are the trained ones: the model reproduces the accuracy.
  logits = second.model.apply({'params': second.params}, data[1].x)
  accuracy = float(np.mean(np.argmax(logits, -1) == data[1].y))
  assert accuracy == pytest.approx(first.metrics['test_accuracy'])
  np.testing.assert_array_equal(second.feature_stats[1], np.ones(4))


def test_cache_key_follows_the_section_and_the_data(tmp_path):
  data = _datasets()
  base = pretrain.pretrain_dir(_section(), str(tmp_path), data)
  assert base == pretrain.pretrain_dir(_section(), str(tmp_path), _datasets())
  assert base != pretrain.pretrain_dir(_section(learning_rate=2e-2),
                                       str(tmp_path), data)
  assert base != pretrain.pretrain_dir(_section(), str(tmp_path),
                                       _datasets(seed=1))
  relabelled = (dataclasses.replace(data[0], y=(data[0].y + 1) % 3), data[1])
  assert base != pretrain.pretrain_dir(_section(), str(tmp_path), relabelled)


def test_interrupted_pretraining_resumes_to_the_same_params(tmp_path):
  data = _datasets()
  whole = pretrain.pretrain(_section(), str(tmp_path / 'a'), datasets=data)
  workdir = pretrain.pretrain_dir(_section(), str(tmp_path / 'b'), data)
  supervised.train_and_evaluate(_section(), workdir, datasets=data,
                                stop_after_steps=3)
  resumed = pretrain.pretrain(_section(), str(tmp_path / 'b'), datasets=data)
  assert not resumed.reused
  jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)


def test_bad_section_is_rejected_before_training(tmp_path):
  with pytest.raises(ValueError, match='config.num_steps'):
    pretrain.pretrain(_section(num_steps=0), str(tmp_path),
                      datasets=_datasets())


def test_a_finished_run_of_other_data_is_not_reused(tmp_path):
  # The few-shot study reuses global/ by path: a run whose speaker pool
  # changed (e.g. no meta-training speakers held out) must not silently
  # report the old model as its own.
  workdir = str(tmp_path / 'global')
  pretrain.pretrain(_section(), str(tmp_path), datasets=_datasets(),
                    workdir=workdir)
  with pytest.raises(ValueError, match='was trained with 48 train examples, '
                     'this run has 40'):
    pretrain.pretrain(_section(), str(tmp_path), datasets=_datasets(n=40),
                      workdir=workdir)
  # The same data is reused as before.
  again = pretrain.pretrain(_section(), str(tmp_path), datasets=_datasets(),
                            workdir=workdir)
  assert again.reused
