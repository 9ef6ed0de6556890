"""The continual binary's run on its shipped config, and bad configs.

Every variant of configs/continual_kws.py's smoke config runs end to end
through `continual.experiment.run` (the only thing experiments/continual.py
calls); every bad value is rejected with a ValueError that names its key
before any data loads.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from central import pretrain
from configs import continual_kws
from continual import experiment
from continual import learner
from continual import pretrained as pretrained_lib
from continual import regularizers
from continual import streams
from continual import validation
from ondevice import options
from ondevice import user_corpus
from ondevice.data import registry

CONFIG_FILE = 'configs/continual_kws.py'


def test_smoke_config_runs_every_variant(tmp_path):
  """configs/continual_kws.py:smoke, every variant (tent, EWC, BN included)."""
  config = continual_kws.get_config('smoke')
  results = experiment.run(config, str(tmp_path))
  variants = results['variants']
  # The smoke config runs every variant of the full one.
  assert sorted(variants) == sorted(continual_kws.get_config().variants) == [
      'bn_adapt', 'no_regularizer', 'no_teacher_bn', 'no_verification',
      'tent', 'verified+ewc', 'verified+l2_sp', 'verified+lwf']
  assert next(iter(variants)) == config.main_variant == 'verified+lwf'
  # 96 clips in chunks of 48: points after 0, 1 and 2 chunks.
  chunks = config.stream.length // config.stream.chunk_size
  for name, variant in variants.items():
    users = variant['users']
    assert len(users) == config.users.num_typical + config.users.num_outlier
    for user in users:
      assert [p['clips'] for p in user['curve']] == [0, 48, 96], name
      assert 0.0 <= user['final_user_accuracy'] <= 1.0
      assert sum(s['clips'] for s in user['quality']['by_source'].values()
                 ) == config.stream.length
    assert len(variant['curve']) == chunks + 1
  # TENT and BN adaptation never pseudo-label.
  assert variants['tent']['mean']['accepted'] == 0
  assert variants['bn_adapt']['mean']['accepted'] == 0
  with open(tmp_path / 'results.json') as f:
    written = json.load(f)
  assert list(written['variants']) == list(variants)
  assert written['config']['learner']['method']['name'] == 'pseudo_label'
  text = (tmp_path / 'results.md').read_text()
  assert all(f'| {name} |' in text for name in variants)
  assert (tmp_path / 'curves.png').stat().st_size > 0


def test_every_variant_of_the_full_config_validates():
  """configs/continual_kws.py (full): all eight variants merge and check."""
  config = continual_kws.get_config()
  experiment.validate_config(config)
  for name in config.variants:
    settings = experiment._settings(experiment.variant_config(config, name))  # pylint: disable=protected-access
    if name == 'tent' or name == 'bn_adapt':
      assert not settings.teacher_bn and settings.method == name


def test_the_schemas_name_every_method_regulariser_and_drift():
  schemas = validation.SCHEMAS
  assert tuple(schemas['learner.method']) == learner.METHODS
  assert tuple(schemas['regularizer']) == regularizers.REGULARIZERS
  assert tuple(schemas['stream.drift']) == streams.DRIFTS
  # And the shipped config declares exactly those sub-configs.
  config = continual_kws.get_config()
  for key, schema in schemas.items():
    node = config
    for part in key.split('.'):
      node = node[part]
    assert set(node) == set(schema) | {'name'}
    for choice, keys in schema.items():
      assert set(node[choice]) == set(keys), (key, choice)


_set = options.set_value


# ({dotted key: value}, text the error must contain), on the smoke config.
BAD = [
    ({'learner.method.pseudo_label.learning_rate': -1e-3},
     'config.learner.method.pseudo_label.learning_rate'),
    ({'learner.method.tent.learning_rate': 0.0},
     'config.learner.method.tent.learning_rate'),
    ({'learner.method.name': 'fixmatch'}, 'config.learner.method.name'),
    ({'regularizer.name': 'lwf'}, 'config.regularizer.name'),
    ({'stream.drift.name': 'reverb'}, 'config.stream.drift.name'),
    ({'trainable.name': 'bias_onyl'}, 'config.trainable.name'),
    ({'trainable.name': 'lite_residual'}, 'config.trainable.name'),
    ({'quant': 'int4'}, 'config.quant'),
    ({'pseudo.confidence': 1.5}, 'config.pseudo.confidence'),
    ({'pseudo.target_far': 0.0}, 'config.pseudo.target_far'),
    ({'users.num_enroll': 0}, 'config.users.num_enroll'),
    ({'users.utterances_per_word': 2}, 'config.users.utterances_per_word'),
    ({'users.first_index': 3}, 'config.users.first_index'),
    ({'users.num_outlier': 0}, 'config.users.num_typical'),
    ({'stream.chunk_size': 0}, 'config.stream.chunk_size'),
    ({'stream.mix': (0.5, 0.5, 0.0, -1.0)}, 'config.stream.mix'),
    ({'stream.length': 10000}, 'config.stream.length'),
    ({'stream.drift.noise.start': 1.0}, 'config.stream.drift.noise.start'),
    ({'stream.drift.speed.rate': -1.3}, 'config.stream.drift.speed.rate'),
    ({'regularizer.distillation.temperature': 0.0},
     'config.regularizer.distillation.temperature'),
    ({'regularizer.distillation.min_teacher_confidence': 2.0},
     'config.regularizer.distillation.min_teacher_confidence'),
    ({'regularizer.ewc.fisher_examples': 0},
     'config.regularizer.ewc.fisher_examples'),
    ({'learner.batch_size': 0}, 'config.learner.batch_size'),
    ({'learner.method.bn_adapt.bn_window': 0},
     'config.learner.method.bn_adapt.bn_window'),
    ({'enroll.learning_rate': -3e-4}, 'config.enroll.learning_rate'),
    ({'global_eval_examples': 0}, 'config.global_eval_examples'),
    ({'main_variant': 'nope'}, 'config.main_variant'),
    ({'pretrain.batch_size': 0}, 'config.pretrain.batch_size'),
    ({'variants.tent': {'learner': {'method': {'tent': {
        'learning_rate': -1.0}}}}},
     'config.learner.method.tent.learning_rate'),
    ({'variants.bad': {'pseudo': {'verifiy': False}}},
     'config.variants.bad sets pseudo.verifiy'),
    ({'variants.bad': {'regularizer': {'name': 'lwf'}}},
     'config.regularizer.name'),
]


@pytest.fixture
def no_data(monkeypatch):
  """Any data load or pre-training fails the test."""
  def fail(*args, **kwargs):
    raise AssertionError(f'data loaded before validation: {args} {kwargs}')
  for module, name in ((registry, 'load_dataset'), (pretrain, 'pretrain'),
                       (pretrained_lib, 'load_pretrained'),
                       (user_corpus, 'load_users'),
                       (user_corpus, 'load_user_arrays')):
    monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize('changes,key', BAD,
                         ids=[next(iter(c)) + f'-{i}'
                              for i, (c, _) in enumerate(BAD)])
def test_bad_config_is_rejected_before_data(no_data, tmp_path, changes, key):
  """configs/continual_kws.py:smoke with one bad value."""
  config = continual_kws.get_config('smoke')
  for dotted, value in changes.items():
    _set(config, dotted, value)
  start = time.perf_counter()
  with pytest.raises(ValueError) as error:
    experiment.run(config, str(tmp_path))
  assert key in str(error.value)
  assert time.perf_counter() - start < 5.0
  if 'variants.' in next(iter(changes)) and 'sets' not in key:
    name = next(iter(changes)).split('.')[1]
    assert f'config.variants.{name}' in str(error.value)


def test_errors_list_the_valid_names(no_data, tmp_path):
  config = continual_kws.get_config('smoke')
  config.regularizer.name = 'lwf'
  with pytest.raises(ValueError, match="'distillation', 'l2_sp', 'ewc'"):
    experiment.run(config, str(tmp_path))
  config = continual_kws.get_config('smoke')
  config.stream.drift.name = 'reverb'
  with pytest.raises(ValueError, match="'none', 'noise', 'speed'"):
    experiment.run(config, str(tmp_path))


def test_a_sub_config_with_a_missing_or_unknown_key_is_rejected(no_data,
                                                                tmp_path):
  config = continual_kws.get_config('smoke')
  del config.regularizer.l2_sp['strength']
  config.regularizer.l2_sp.strenght = 1.0
  with pytest.raises(ValueError, match=r"config.regularizer.l2_sp must hold "
                     r"exactly \['strength'\]"):
    experiment.run(config, str(tmp_path))


def test_the_valid_smoke_config_gets_as_far_as_loading_data(no_data,
                                                             tmp_path):
  """The guard above is real: a good config passes validation and loads."""
  with pytest.raises(AssertionError, match='data loaded'):
    experiment.run(continual_kws.get_config('smoke'), str(tmp_path))


def test_ewc_variants_must_share_one_fisher_estimate(no_data, tmp_path):
  config = continual_kws.get_config('smoke')
  config.variants.ewc_a = {'regularizer': {'name': 'ewc'}}
  config.variants.ewc_b = {'regularizer': {'name': 'ewc',
                                           'ewc': {'fisher_examples': 16}}}
  with pytest.raises(ValueError,
                     match=r'config.regularizer.ewc.fisher_examples differs'):
    experiment.run(config, str(tmp_path))


def test_the_binary_rejects_a_command_line_override_before_data(tmp_path):
  """experiments/continual.py on configs/continual_kws.py:smoke, a bad flag.

  Every option is a flag of the locked config; the error names the key.
  """
  command = [sys.executable, '-m', 'experiments.continual',
             '--config=configs/continual_kws.py:smoke',
             f'--workdir={tmp_path}',
             '--config.learner.method.name=tent',
             '--config.learner.method.tent.learning_rate=-0.1']
  done = subprocess.run(command, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)),
                        check=False, timeout=120)
  assert done.returncode != 0
  assert 'config.learner.method.tent.learning_rate must be > 0' in done.stderr
  # Validation comes first: no pre-training was started or reused.
  assert 'Pre-training' not in done.stderr and 'Reusing' not in done.stderr
