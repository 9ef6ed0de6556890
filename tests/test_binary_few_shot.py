"""The few-shot binary (experiments/few_shot.py) on configs/few_shot_kws.py.

Every variant of configs/few_shot_kws.py runs end to end at smoke size
through `few_shot.experiment.run` (what the binary calls), on the real
synthetic speech corpus; bad configs are rejected with an error that names
the key before any data loads (the loaders are replaced by functions that
fail the test).
"""
import ast
import json
import os
import time

import pytest

from central import supervised
from configs import few_shot_kws
from few_shot import experiment
from ondevice import options
from ondevice import user_corpus
from ondevice.data import registry

CONFIG_FILE = 'configs/few_shot_kws.py'
SMOKE_VARIANTS = ('smoke', 'smoke,backbone=ds_cnn_s')
FULL_VARIANTS = ('', 'backbone=ds_cnn_s', 'backbone=ds_cnn_s,outliers')


def _locked(arg):
  """The config as --config=configs/few_shot_kws.py:<arg> gives it."""
  config = few_shot_kws.get_config(arg)
  config.lock()
  return config


@pytest.mark.parametrize('arg', SMOKE_VARIANTS)
def test_every_smoke_variant_of_the_config_file_runs_end_to_end(arg,
                                                               tmp_path):
  config = _locked(arg)
  results = experiment.run(config, str(tmp_path))
  personal = results['personalisation']
  assert set(personal) == {'global', 'global+finetune_full', 'maml'}
  # config.users: one typical and one outlier-accent user, both new.
  groups = results['users']['groups']
  assert {g: len(v) for g, v in groups.items()} == {'typical': 1,
                                                   'outlier': 1}
  assert min(results['users']['users']) >= config.users.first_index
  # 8 speakers: 2 held out for test, a third of the other 6 meta-train.
  assert results['speakers'] == {'pretrain': 4, 'meta_train': 2, 'test': 2}
  for by_k in personal.values():
    assert 0.0 <= by_k[1]['all']['false_accept_rate'] <= config.far
  assert set(results['keyword_split']) == {'protonet'}
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['config']['model'] == config.model
  assert os.path.exists(tmp_path / 'report.md')


def test_the_outlier_study_smoke_variant_scores_three_groups(tmp_path):
  # configs/few_shot_kws.py:outliers,smoke on the multi-engine population.
  config = _locked('outliers,smoke')
  results = experiment.run(config, str(tmp_path))
  users = results['users']
  screening = users['screening']
  # round(0.2 * 5 candidates) = 1 worst user: the lowest calibration rate
  # (ties to the lower index), among the candidates, never an outlier.
  rates = {int(u): r for u, r in
           screening['calibration_detection_rate'].items()}
  assert sorted(rates) == screening['candidates']
  lowest = min(rates, key=lambda u: (rates[u], u))
  assert users['groups']['worst'] == [lowest]
  assert len(users['groups']['typical']) == 2
  assert len(users['groups']['outlier']) == 1
  assert not set(users['groups']['outlier']) & set(screening['candidates'])
  scored = sorted(set().union(*map(set, users['groups'].values())))
  assert users['users'] == scored
  for label, by_k in results['personalisation'].items():
    assert set(by_k[1]) == {'typical', 'outlier', 'worst', 'all'}
    assert len(users['detection_rate'][label][1]) == len(scored)
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['config']['data']['population'] == 'mixed_unseen'


@pytest.mark.parametrize('arg', FULL_VARIANTS)
def test_full_variants_of_the_config_file_validate(arg):
  experiment.validate_config(_locked(arg))


def test_the_binary_only_calls_experiment_run_through_run_binary():
  # Parsed, not imported: importing a binary defines the global --config
  # and --workdir flags, which another binary's test may define too.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, 'experiments', 'few_shot.py')) as f:
    tree = ast.parse(f.read())
  main = next(n for n in tree.body
              if isinstance(n, ast.FunctionDef) and n.name == 'main')
  calls = [ast.unparse(n) for n in ast.walk(main) if isinstance(n, ast.Call)]
  assert calls == ['common.run_binary(experiment.run, _CONFIG, _WORKDIR)']


def _set(key, value):
  return lambda config: options.set_value(config, key, value)


def _unknown_argument(config):
  with config.meta.reptile.unlocked():
    config.meta.reptile.outer_lr = 1e-3  # Reptile's outer step is step_size.


# (what to change, the key the error must name)
BAD_CONFIGS = [
    (_set('personalize.learning_rate', -0.01),
     'config.personalize.learning_rate'),
    (_set('personalize.num_steps', 0), 'config.personalize.num_steps'),
    (_set('personalize.k_values', (1, 3)), 'config.personalize.k_values'),
    (_set('personalize.trainable', ('full', 'lite_residual')),
     'config.personalize.trainable'),
    (_set('personalize.trainable_kwargs.sparse_channels.fraction', 2.0),
     'config.personalize.trainable_kwargs.sparse_channels'),
    (_set('personalize.replay_per_word', -1),
     'config.personalize.replay_per_word'),
    (_set('meta.names', ('maml', 'mamll')), 'config.meta.names'),
    (_set('meta.maml.inner_lr', -1.0), 'config.meta.maml.inner_lr'),
    (_set('meta.maml.inner_steps', 0), 'config.meta.maml.inner_steps'),
    (_set('meta.reptile.step_size', 0.0), 'config.meta.reptile.step_size'),
    (_unknown_argument, 'config.meta.reptile'),
    (_set('meta.train_k', 2), 'config.meta.train_k'),
    (_set('meta.speaker_fraction', 1.0), 'config.meta.speaker_fraction'),
    (_set('meta.checkpoint_every', -1), 'config.meta.checkpoint_every'),
    (_set('pretrain.checkpoint_every', 7), 'config.pretrain.checkpoint_every'),
    (_set('keyword_split.names', ('protonets',)),
     'config.keyword_split.names'),
    (_set('keyword_split.protonet.outer_lr', -1e-3),
     'config.keyword_split.protonet.outer_lr'),
    (_set('keyword_split.n_way', 1), 'config.keyword_split.n_way'),
    (_set('keyword_split.test_words', ('yes', 'cat')),
     'config.keyword_split.train_words'),
    (_set('quant', 'int4'), 'config.quant'),
    (_set('model', 'resnet'), 'config.model'),
    # The smoke MLP's hidden sizes are no DS-CNN field.
    (_set('model', 'ds_cnn_s'), 'config.model_kwargs'),
    (_set('norm', 'batch'), 'config.norm'),
    (_set('far', 1.0), 'config.far'),
    (_set('keywords', ('yes', 'yess')), 'config.keywords'),
    (_set('users.first_index', 3), 'config.users.first_index'),
    (_set('users.num_outlier', -1), 'config.users.num_outlier'),
    (_set('pretrain.batch_size', 0), 'config.pretrain.batch_size'),
    (_set('pretrain.optimizer', 'adamm'), 'config.pretrain.optimizer'),
    (_set('data.test_fraction', 0.0), 'config.data.test_fraction'),
    (_set('report.outlier_gain_goal', -0.3),
     'config.report.outlier_gain_goal'),
    (_set('users.worst_candidates', 10), 'config.users.calibration_utterances'),
    (_set('users.calibration_utterances', -1),
     'config.users.calibration_utterances'),
    (_set('users.other_utterances_per_word', -2),
     'config.users.other_utterances_per_word'),
    (_set('data.population', 'mixed'), 'config.users.num_outlier'),
    (_set('data.population', 'mixd'), 'config.data.population'),
]


def _fail(*args, **kwargs):
  raise AssertionError('data loaded or training started before validation')


@pytest.mark.parametrize('change,key', BAD_CONFIGS,
                         ids=[key for _, key in BAD_CONFIGS])
def test_bad_config_is_rejected_naming_the_key_before_data_loads(
    change, key, monkeypatch, tmp_path):
  for module, name in ((registry, 'load_dataset'),
                       (user_corpus, 'load_users'),
                       (supervised, 'train_and_evaluate')):
    monkeypatch.setattr(module, name, _fail)
  config = _locked('smoke')
  change(config)
  start = time.time()
  with pytest.raises(ValueError) as error:
    experiment.run(config, str(tmp_path / 'run'))
  assert key in str(error.value)
  assert time.time() - start < 5.0
  assert not os.path.exists(tmp_path / 'run')  # Nothing written either.
