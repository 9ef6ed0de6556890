"""Results assembly of benchmarks/fed_personalize_k5.py on hand-made users."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import fed_personalize_k5 as k5

# Four users: 0, 1 typical; 2 unseen ('outlier'); 1, 3 worst.
MASKS = {'typical': np.array([1, 1, 0, 0], bool),
         'outlier': np.array([0, 0, 1, 0], bool),
         'worst': np.array([0, 1, 0, 1], bool)}


def _users(ka, dr):
  return {'keyword_accuracy': np.array(ka, np.float64),
          'detection_rate': np.array(dr, np.float64)}


PER_USER_K5 = {
    'fedavg+finetune': _users([.5, .5, .5, .5], [.4, .4, .4, .4]),
    'per_fedavg': _users([.6, .7, .9, .8], [.4, .4, .3, .5]),
    'per_fedavg_composed': _users([.6, .6, .8, .9], [.4, .4, .4, .4]),
}
EXISTING = {'personalized_k5': None, 'secagg_overhead': {'10': 19.3},
            'composed_vs_float': {'accuracy_delta': None, 'bytes_ratio': 0.035,
                                  'memory_ratio': 0.37,
                                  'step_time_ratio': 2.8}}


def _assembled():
  per_user = {label: {5: values} for label, values in PER_USER_K5.items()}
  per_user['per_fedavg'][1] = PER_USER_K5['fedavg+finetune']
  per_user['fedavg+finetune'][1] = PER_USER_K5['fedavg+finetune']
  return k5.assemble(per_user, MASKS, {'per_fedavg': 'plain'},
                     {'fedavg': {'rounds': 2}}, EXISTING)


def test_group_means_and_standard_errors():
  block = _assembled()['personalized_k5']['per_fedavg']
  assert block['typical']['keyword_accuracy'] == pytest.approx(0.65)
  # std([.6, .7], ddof=1) / sqrt(2) = 0.05.
  assert block['typical']['keyword_accuracy_se'] == pytest.approx(0.05)
  assert block['worst']['detection_rate'] == pytest.approx(0.45)
  assert block['outlier']['num_users'] == 1
  assert block['outlier']['keyword_accuracy_se'] == 0.0
  assert block['all']['num_users'] == 4
  assert block['all']['keyword_accuracy'] == pytest.approx(0.75)


def test_paired_differences_against_fedavg_finetune():
  versus = _assembled()['personalized_k5']['versus_fedavg_finetune']
  assert set(versus) == {'per_fedavg'}  # fed_reptile was not evaluated.
  worst = versus['per_fedavg']['worst']
  # Keyword accuracy differences .2, .3: mean .25, SE .05 -> ahead.
  assert worst['keyword_accuracy']['diff'] == pytest.approx(0.25)
  assert worst['keyword_accuracy']['se'] == pytest.approx(0.05)
  assert worst['keyword_accuracy']['ahead_by_2se']
  # Detection-rate differences 0, .1: mean .05 < 2 x SE .05 -> not ahead.
  assert worst['detection_rate']['diff'] == pytest.approx(0.05)
  assert not worst['detection_rate']['ahead_by_2se']
  union = versus['per_fedavg']['unseen_or_worst']['keyword_accuracy']
  # Users 1, 2, 3: differences .2, .4, .3; SE .1 / sqrt(3).
  assert union['n'] == 3
  assert union['diff'] == pytest.approx(0.3)
  assert union['se'] == pytest.approx(0.1 / np.sqrt(3))
  # One unseen user: no SE, so never "ahead by 2 SE".
  unseen = versus['per_fedavg']['unseen']['keyword_accuracy']
  assert unseen['n'] == 1 and unseen['diff'] == pytest.approx(0.4)
  assert not unseen['ahead_by_2se']


def test_composed_accuracy_delta_in_points_and_existing_keys_kept():
  results = _assembled()
  c = results['composed_vs_float']
  # Composed minus float: 0, -.1, -.1, +.1 -> -2.5 points.
  assert c['accuracy_delta'] == pytest.approx(-2.5)
  diffs = np.array([0, -.1, -.1, .1])
  assert c['accuracy_delta_se'] == pytest.approx(
      100 * diffs.std(ddof=1) / 2)
  assert c['accuracy_delta_num_users'] == 4
  assert not c['accuracy_delta_within_2_points']
  assert c['bytes_ratio'] == 0.035 and c['step_time_ratio'] == 2.8
  assert results['secagg_overhead'] == {'10': 19.3}
  assert results['federated_runs'] == {'fedavg': {'rounds': 2}}
  # K = 1 has its own block; only fedavg+finetune and per_fedavg there.
  assert set(results['personalized_k1']) == {
      'fedavg+finetune', 'per_fedavg', 'versus_fedavg_finetune'}


def test_no_delta_without_both_per_fedavg_runs():
  per_user = {'fedavg+finetune': {5: PER_USER_K5['fedavg+finetune']}}
  results = k5.assemble(per_user, MASKS, {}, {}, EXISTING)
  assert results['composed_vs_float']['accuracy_delta'] is None
  assert results['personalized_k5']['versus_fedavg_finetune'] == {}


def test_study_check_pairs_global_finetune_with_the_study(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  study = {'personalisation': {'global+finetune_full': {'5': {'all': {
      'keyword_accuracy': 0.7, 'detection_rate': 0.6}}}}}
  (tmp_path / 'results.json').write_text(json.dumps(study))
  per_user = {'global+finetune': {5: PER_USER_K5['fedavg+finetune'],
                                  1: PER_USER_K5['fedavg+finetune']}}
  results = k5.assemble(per_user, MASKS, {}, {}, EXISTING)
  check = k5.study_check(results, str(tmp_path))
  assert set(check) == {'5'}  # The study has no K = 1 block here.
  assert check['5']['keyword_accuracy'] == {'study': 0.7, 'here': 0.5}
  assert check['5']['detection_rate']['here'] == pytest.approx(0.4)
