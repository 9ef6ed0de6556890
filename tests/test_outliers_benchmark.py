"""benchmarks/outliers.py on the committed 200-speaker study run."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import cli
from benchmarks import outliers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, 'benchmarks', 'results', 'outliers',
                   'corpus_200_speakers', 'few_shot_results.json')


def test_summary_of_the_200_speaker_run():
  with open(RUN) as f:
    results = json.load(f)
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
