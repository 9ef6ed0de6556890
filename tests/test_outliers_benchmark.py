"""benchmarks/outliers.py on the committed 200-speaker study run."""
from __future__ import annotations

import copy
import json
import os

import pytest

from benchmarks import cli
from benchmarks import outliers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(*parts):
  """A committed file under benchmarks/results/outliers."""
  with open(os.path.join(ROOT, 'benchmarks', 'results', 'outliers',
                         *parts)) as f:
    return json.load(f)


def test_summary_of_the_200_speaker_run():
  results = _load('corpus_200_speakers', 'few_shot_results.json')
  summary = outliers.summarise(results, {})
  assert summary['global_typical_accuracy'] == pytest.approx(0.76978, abs=1e-5)
  unseen = summary['outlier_unseen_gain_k5']
  # FO-MAML at K=5: 0.3816 -> 0.4602 unseen, typical users +8.5 points.
  assert unseen['method'] == 'fomaml' and unseen['k'] == 5
  assert unseen['relative_gain'] == pytest.approx(0.4602 / 0.3816 - 1,
                                                  abs=1e-3)
  assert not unseen['goal_met']
  versus = summary['meta_vs_finetune_k1']
  assert versus['n'] == 181 and not versus['ahead_by_2se']
  assert summary['population'] == {
      'name': 'mixed_unseen', 'corpus_speakers': 200, 'first_user_index': 200,
      'speakers': {'pretrain': 66, 'meta_train': 22, 'test': 22}}
  text = outliers.markdown(summary)
  assert "Population 'mixed_unseen': a corpus of 200 speakers (66 in " in text
  assert '**+20.6%** (fomaml, K=5: 0.382 -> 0.460' in text


def test_a_run_without_results_is_named(tmp_path):
  cli.parse(outliers.FLAGS, ['outliers', f'--run={tmp_path}',
                             f'--out={tmp_path / "o.json"}'])
  with pytest.raises(FileNotFoundError, match='has no results.json'):
    outliers.main([])


def test_versus_run_supplies_the_meta_comparison_and_its_setting():
  results = _load('corpus_200_speakers', 'few_shot_results.json')
  versus = copy.deepcopy(results)
  versus['config']['personalize'].update(learning_rate=0.01, num_steps=20)
  versus['goals']['meta_vs_finetune_k1']['best'].update(diff=0.05, se=0.01)
  summary = outliers.summarise(results, {}, versus)
  # The gains stay --run's (SGD 1e-3 x 5 steps there) ...
  assert summary['adaptation'] == {'learning_rate': 0.001, 'num_steps': 5}
  assert summary['outlier_unseen_gain_k5']['method'] == 'fomaml'
  # ... the comparison is --versus_run's, with its own setting: 0.05 is
  # 5 s.e., so the lead is met there.
  best = summary['meta_vs_finetune_k1']
  assert best['diff'] == 0.05 and best['ahead_by_2se']
  assert best['adaptation'] == {'learning_rate': 0.01, 'num_steps': 20}
  text = outliers.markdown(summary)
  assert 'fine-tuning (SGD 0.001 x 5 steps)' in text
  assert 'reptile +0.0500 (s.e. 0.0100) (SGD 0.01 x 20 steps)' in text


def test_versus_run_of_other_users_is_refused():
  results = _load('corpus_200_speakers', 'few_shot_results.json')
  other = _load('corpus_600_global_4000_steps', 'few_shot_results.json')
  with pytest.raises(ValueError, match='not the same study.*users differ'):
    outliers.summarise(results, {}, other)
  changed = copy.deepcopy(results)
  changed['global_model']['test_accuracy'] = 0.5
  with pytest.raises(ValueError, match='global model accuracy differ'):
    outliers.summarise(results, {}, changed)
