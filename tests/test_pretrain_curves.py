"""Tests of benchmarks/pretrain_curves.py."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import pretrain_curves


def _run(root, name, rows, final=None):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  if final is not None:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(final, f)
  return workdir


def test_reads_evaluations_and_picks_last_and_best(tmp_path):
  workdir = _run(tmp_path, 'a', [
      {'step': 100, 'train_accuracy': 0.3},
      {'step': 500, 'train_accuracy': 0.5, 'test_accuracy': 0.4},
      {'step': 1000, 'train_accuracy': 0.9, 'test_accuracy': 0.7},
      {'step': 1500, 'train_accuracy': 0.95, 'test_accuracy': 0.65}],
                 final={'num_train_examples': 7128})
  run = pretrain_curves.read_run(workdir)
  # Rows without a test accuracy are training logs, not evaluations.
  assert [c['step'] for c in run['curve']] == [500, 1000, 1500]
  assert run['best_test_accuracy'] == 0.7
  assert run['last_test_accuracy'] == 0.65
  text = pretrain_curves.markdown({'runs': {'66 speakers': run}})
  assert '| 66 speakers | 1500 | 0.6500 | 0.7000 | 0.9500 | 7128 |' in text


def test_bad_run_specs_are_named(tmp_path):
  workdir = _run(tmp_path, 'a', [{'step': 1, 'test_accuracy': 0.1}])
  assert pretrain_curves.parse_runs([f'x={workdir}']) == [('x', workdir)]
  with pytest.raises(ValueError, match='expected label=workdir'):
    pretrain_curves.parse_runs([workdir])
  with pytest.raises(ValueError, match='has no metrics.jsonl'):
    pretrain_curves.parse_runs([f'x={tmp_path}'])
  with pytest.raises(ValueError, match='is empty'):
    pretrain_curves.parse_runs([])
