"""few_shot.report: the goals and the meta-vs-fine-tuning table, by hand."""
from configs import few_shot_kws
from few_shot import report


def _summary(outlier, typical):
  return {'outlier': {'detection_rate': outlier, 'false_accept_rate': 0.05,
                      'keyword_accuracy': outlier, 'num_users': 1},
          'typical': {'detection_rate': typical, 'false_accept_rate': 0.05,
                      'keyword_accuracy': typical, 'num_users': 1}}


def _config():
  config = few_shot_kws.get_config('smoke')
  config.personalize.k_values = (1, 5)
  config.meta.names = ('meta_sgd',)
  return config


def _personal(with_all):
  personal = {
      'global': {k: _summary(0.5, 0.8) for k in (1, 5)},
      'global+finetune_full': {1: _summary(0.55, 0.85),
                               5: _summary(0.6, 0.9)},
      'meta_sgd': {1: _summary(0.6, 0.84), 5: _summary(0.66, 0.88)}}
  if with_all:
    personal['global_all+finetune_full'] = {1: _summary(0.7, 0.9),
                                            5: _summary(0.7, 0.9)}
  return personal


def test_goals_by_hand():
  g = report.goals(_personal(False), _config())
  best = g['best_outlier_gain']
  # meta_sgd at K=5: 0.66 / 0.5 - 1 = +32%, over the 30% goal.
  assert (best['method'], best['k']) == ('meta_sgd', 5)
  assert abs(best['relative_gain'] - 0.32) < 1e-9
  assert g['outlier_gain_goal_met']
  versus = g['meta_vs_plain_finetune']
  assert versus['meta_sgd/K=1/outlier'] == {
      'meta': 0.6, 'plain': 0.55, 'meta_beats_plain': True}
  assert versus['meta_sgd/K=5/typical']['meta_beats_plain'] is False
  assert 'plain_all' not in versus['meta_sgd/K=1/outlier']


def test_table_has_global_all_columns_only_when_that_baseline_ran():
  config = _config()
  for with_all in (False, True):
    personal = _personal(with_all)
    text = report.markdown({'personalisation': personal,
                            'goals': report.goals(personal, config),
                            'global_model': {'test_accuracy': 0.9},
                            'keyword_split': {}, 'seconds': 1.0}, config)
    assert ('FT global_all' in text) == with_all
    assert 'meta > FT global |' in text
