"""The contribution-analysis binary on its shipped config, and bad configs.

configs/contribution_kws.py runs through experiments/contribution_analysis.py
in both of its variants (transfer to new words, and the same words); every
bad value below is refused before any data loads, naming its key.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import contribution_kws
from ondevice import options
from ondevice.data import registry
from sparse_updates import experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('variant', ['smoke', 'smoke,same_words'])
def test_binary_runs_the_shipped_config(tmp_path, variant):
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.contribution_analysis',
       f'--config=configs/contribution_kws.py:{variant}',
       f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / 'contribution.json') as f:
    results = json.load(f)
  labels = [r['scheme'] for r in results['schemes']]
  same_words = 'same_words' in variant
  assert ('pre-trained (no update)' in labels) == same_words
  assert labels[-2:] == ['searched @ 256 KB', 'searched @ 1024 KB']
  for row in results['schemes']:
    assert 0.0 <= row['test_accuracy'] <= 1.0
  assert os.path.getsize(tmp_path / 'contribution_gains.png') > 0


_set = options.set_value


@pytest.mark.parametrize('key,value,named', [
    ('schemes', ('full', 'everything'), 'config.schemes'),
    ('search.budgets_kb', (256, 0), 'config.search.budgets_kb'),
    ('search.relu_mask_bits', 4, 'config.search.relu_mask_bits'),
    ('search.batch_size', 0, 'config.search.batch_size'),
    ('search.min_gain', -0.5, 'config.search.min_gain'),
    ('finetune.optimizer', 'lion', 'lion'),
    ('finetune.lr_grid', (0.01, 0.0), 'config.finetune.lr_grid'),
    ('finetune.batch_size', 0, 'config.finetune.batch_size'),
    ('finetune.num_steps', -1, 'config.finetune.num_steps'),
    ('finetune.learning_rate', -0.1, 'config.finetune.learning_rate'),
    ('adapt_fraction', 0.8, 'config.adapt_fraction'),
    ('val_fraction', 0.0, 'config.val_fraction'),
    ('unit_weight_fraction', 1.5, 'config.unit_weight_fraction'),
    ('model', 'resnet9000', 'config.model'),
    ('last_k', 0, 'config.last_k'),
    ('pretrain.batch_size', 0, 'config.pretrain'),
])
def test_bad_values_are_refused_before_data_loads(tmp_path, monkeypatch, key,
                                                  value, named):
  def no_data(*args, **kwargs):
    raise AssertionError('data loaded before the config was validated')
  monkeypatch.setattr(registry, 'load_dataset', no_data)
  config = contribution_kws.get_config('smoke')
  _set(config, key, value)
  with pytest.raises(ValueError) as error:
    experiment.run(config, str(tmp_path))
  assert named in str(error.value)
