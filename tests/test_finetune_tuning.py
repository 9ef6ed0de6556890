"""benchmarks/finetune_tuning.py: validation users, the grid and the choice."""
from __future__ import annotations

import json

import pytest

from benchmarks import cli
from benchmarks import finetune_tuning as tuning
from configs import few_shot_kws
from few_shot import user_groups


def test_validation_users_lie_past_every_evaluated_user():
  config = few_shot_kws.get_config('outliers,smoke')
  evaluated = user_groups.pick(config)
  val = tuning.validation_config(config, 3)
  picked = user_groups.pick(val)
  last = max(max(ids) for ids in evaluated.values() if ids)
  assert val.users.first_index == last + 1
  assert len(picked['typical']) == 3 and len(picked['outlier']) == 3
  assert picked['candidates'] == []
  assert min(picked['typical'] + picked['outlier']) > last
  # The study's own config is untouched.
  assert config.users.first_index != val.users.first_index


def test_grid_and_choice():
  assert tuning.grid(['0.01', '0.1'], ['5']) == [(0.01, 5), (0.1, 5)]
  with pytest.raises(ValueError, match='must be positive'):
    tuning.grid(['0.01'], ['0'])
  baseline = {'typical': 0.80, 'outlier': 0.50}
  rows = [{'learning_rate': 0.01, 'steps': 5, 'typical': 0.81,
           'outlier': 0.55},
          # Best unseen rate, but typical users lose 2 points: not chosen.
          {'learning_rate': 0.1, 'steps': 5, 'typical': 0.78,
           'outlier': 0.70},
          {'learning_rate': 0.03, 'steps': 5, 'typical': 0.795,
           'outlier': 0.60}]
  assert tuning.choose(rows, baseline, 0.01)['learning_rate'] == 0.03
  assert tuning.choose(rows, baseline, 0.05)['learning_rate'] == 0.1
  assert tuning.choose(rows[1:2], baseline, 0.01) is None


def test_smoke_run_writes_every_setting(tmp_path):
  out = tmp_path / 'tuning.json'
  cli.parse(tuning.FLAGS, [
      'finetune_tuning', '--config=configs/few_shot_kws.py:outliers,smoke',
      f'--workdir={tmp_path / "study"}', f'--out={out}', '--k=1',
      '--learning_rates=0.01,0.1', '--steps=1,2', '--users_per_group=2'])
  tuning.main([])
  results = json.loads(out.read_text())
  assert [(r['learning_rate'], r['steps']) for r in results['rows']] == [
      (0.01, 1), (0.01, 2), (0.1, 1), (0.1, 2)]
  for row in results['rows'] + [results['baseline']]:
    assert 0.0 <= row['typical'] <= 1.0 and 0.0 <= row['outlier'] <= 1.0
  chosen = results['chosen']
  assert chosen is None or chosen in results['rows']
  assert sorted(results['validation_users']) == ['outlier', 'typical']
  assert (tmp_path / 'tuning.md').exists()
  assert (tmp_path / 'tuning.png').exists()
