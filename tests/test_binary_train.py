"""The central binary (experiments/train.py -> central.supervised.run) on
every shipped config, and bad configs rejected before any data loads.

Shipped configs: configs/kws_central.py and configs/fmnist_central.py, each
with one variant ('smoke').
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from central import supervised
from configs import fmnist_central
from configs import kws_central
from ondevice import options
from ondevice.data import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'configs/kws_central.py': kws_central,
           'configs/fmnist_central.py': fmnist_central}
VARIANTS = [(path, 'smoke') for path in CONFIGS]


@pytest.mark.parametrize('path,variant', VARIANTS)
def test_every_shipped_config_runs(path, variant, tmp_path):
  config = CONFIGS[path].get_config(variant)
  metrics = supervised.run(config, str(tmp_path))
  assert metrics['steps'] == config.num_steps
  assert 0.0 <= metrics['test_accuracy'] <= 1.0
  with open(tmp_path / 'final_metrics.json') as f:
    assert json.load(f)['test_accuracy'] == metrics['test_accuracy']
  with open(tmp_path / 'metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == list(range(config.log_every, config.num_steps + 1,
                             config.log_every))


def test_the_binary_runs_a_shipped_config(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/fmnist_central.py:smoke', '--config.num_steps=5',
       '--config.optimizer_state.name=int8', f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'final_metrics.json') as f:
    assert json.load(f)['steps'] == 5


def _set(key: str, value):
  return lambda config: options.set_value(config, key, value)


def _both(first, second):
  def apply(config):
    first(config)
    second(config)
  return apply


# (the key the error must name, how to make the config bad).
BAD = [
    ('batch_size', _set('batch_size', 0)),
    ('num_steps', _set('num_steps', 0)),
    ('learning_rate', _set('learning_rate', -0.1)),
    ('model', _set('model', 'resnet50')),
    ('quant', _set('quant', 'int4')),
    ('optimizer', _set('optimizer', 'adamax')),
    ('data.name', _set('data.name', 'cifar10')),
    ('eval_batch_size', _set('eval_batch_size', 0)),
    ('label_smoothing', _set('label_smoothing', 1.0)),
    ('label_smoothing', _set('label_smoothing', -0.1)),
    ('trainable.name', _set('trainable.name', 'everything')),
    ('trainable.name', _set('trainable.name', 'lite_residual')),
    ('log_every', _set('log_every', 0)),
    ('checkpoint_every', _set('checkpoint_every', 7)),
    ('schedule', _set('schedule', 'linear')),
    ('weight_decay', _set('weight_decay', -1e-4)),
    ('grad_clip', _set('grad_clip', -1.0)),
    ('momentum', _set('momentum', 1.5)),
    ('norm', _set('norm', 'instance')),
    ('optimizer_state.name', _set('optimizer_state.name', 'int4')),
    ('optimizer_state.int8', _both(_set('optimizer_state.name', 'int8'),
                                   _set('optimizer_state.int8.bits', 1))),
    ('qas.name', _set('qas.name', 'always')),
    ('qas.qas.bits', _both(_set('qas.name', 'qas'), _set('qas.qas.bits', 1))),
    ('data.max_train', _set('data.max_train', -5)),
]
# Fields only one config has.
BAD_KWS = [('data.num_speakers', _set('data.num_speakers', 1)),
           ('data.test_fraction', _set('data.test_fraction', 1.5))]


def _cases():
  for path in CONFIGS:
    extra = BAD_KWS if path == 'configs/kws_central.py' else []
    for key, apply in BAD + extra:
      if key == 'data.max_train' and path == 'configs/kws_central.py':
        continue  # speech_keywords has no max_train field.
      yield pytest.param(path, key, apply, id=f'{path}-{key}')


@pytest.mark.parametrize('path,key,apply', list(_cases()))
def test_bad_config_names_the_key_before_loading_data(path, key, apply,
                                                      tmp_path, monkeypatch):
  def no_loading(*args, **kwargs):
    raise AssertionError('data loading started before validation')
  monkeypatch.setattr(registry, 'load_dataset', no_loading)
  monkeypatch.setattr(registry, '_load_speech_keywords', no_loading)
  monkeypatch.setattr(registry, '_load_fashion_mnist', no_loading)
  config = CONFIGS[path].get_config('smoke')
  apply(config)
  start = time.time()
  with pytest.raises(ValueError, match=f'config\\.{key}'):
    supervised.run(config, str(tmp_path))
  assert time.time() - start < 5
  assert not os.listdir(tmp_path)  # Nothing written either.


def test_tfds_dataset_selected_from_a_shipped_config(tmp_path):
  # configs/fmnist_central.py with --config.data.name=tfds_fashion_mnist,
  # offline through TFDS's mock data.
  tfds = pytest.importorskip('tensorflow_datasets')
  config = fmnist_central.get_config('smoke')
  config.data.name = 'tfds_fashion_mnist'
  config.num_steps = 5
  with tfds.testing.mock_data(num_examples=40):
    metrics = supervised.run(config, str(tmp_path))
  assert metrics['num_train_examples'] == 40
  assert metrics['num_test_examples'] == 40
