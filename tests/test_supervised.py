"""End-to-end tests of the centralised loop: resume, config errors, outputs."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import kws_central
from ondevice import supervised
from ondevice.data.base import ArrayDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6, 4)).astype(np.float32)
  y = (x[:, 0, 0] > 0).astype(np.int32)
  return ArrayDataset(x=x, y=y, client_id=np.zeros(n, np.int32),
                      class_names=('neg', 'pos'))


def _config(**overrides):
  config = kws_central.get_config('smoke')
  config.model = 'mlp'
  config.norm = 'none'
  config.model_kwargs = {}
  config.num_steps = 12
  config.batch_size = 8
  config.log_every = 3
  config.eval_every = 6
  config.checkpoint_every = 100
  config.schedule = 'warmup_cosine'
  config.warmup_steps = 2
  config.update(overrides)
  return config


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
  data = (_synthetic(64, 0), _synthetic(32, 1))
  full = supervised.train_and_evaluate(_config(), str(tmp_path / 'a'),
                                       datasets=data)
  part = supervised.train_and_evaluate(_config(), str(tmp_path / 'b'),
                                       datasets=data, stop_after_steps=5)
  assert part['metrics'] == {'stopped_at': 5}
  resumed = supervised.train_and_evaluate(_config(), str(tmp_path / 'b'),
                                          datasets=data)
  for a, b in zip(jax.tree.leaves(full['state']),
                  jax.tree.leaves(resumed['state'])):
    np.testing.assert_array_equal(a, b)
  # The partial run's params differ: the comparison above is not vacuous.
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(part['state'].params),
      jax.tree.leaves(full['state'].params)))
  with open(tmp_path / 'b' / 'metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [3, 6, 9, 12]  # No duplicate records after resuming.


def test_outputs_are_written(tmp_path):
  data = (_synthetic(512, 0), _synthetic(256, 1))
  out = supervised.train_and_evaluate(
      _config(num_steps=200, batch_size=32, learning_rate=1e-2),
      str(tmp_path), datasets=data)
  for name in ('metrics.jsonl', 'learning_curve.png', 'final_metrics.json'):
    assert os.path.getsize(tmp_path / name) > 0
  assert os.listdir(tmp_path / 'tensorboard')
  # y = [x > 0] on one input feature is learnable well above chance (0.5).
  assert out['metrics']['test_accuracy'] > 0.8


@pytest.mark.parametrize('key,value,match', [
    ('learning_rate', -0.1, 'learning_rate'),
    ('model', 'resnet9000', 'config.model'),
    ('batch_size', 1000, 'batch_size'),
    ('optimizer', 'adamax', 'config.optimizer'),
    ('num_steps', 0, 'num_steps'),
])
def test_bad_values_fail_before_compilation(tmp_path, monkeypatch, key, value,
                                            match):
  def no_jit(*args, **kwargs):
    raise AssertionError('compilation started before validation')
  monkeypatch.setattr(supervised.jax, 'jit', no_jit)
  data = (_synthetic(64, 0), _synthetic(32, 1))
  with pytest.raises(ValueError, match=match):
    supervised.train_and_evaluate(_config(**{key: value}), str(tmp_path),
                                  datasets=data)


def test_unknown_override_key_is_rejected_by_the_binary(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/kws_central.py:smoke', '--config.num_stepz=5',
       f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'num_stepz' in proc.stderr


def test_unknown_config_variant_is_rejected():
  with pytest.raises(ValueError, match='smok'):
    kws_central.get_config('smok')
