"""The FedUV binary's run on every shipped config variant, and bad configs.

Every variant of configs/feduv_kws.py runs end to end through
`fedjax_ext.feduv.experiment.run` (the only thing experiments/feduv.py
calls); every bad value is rejected with a ValueError that names its key
before any data loads.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import feduv_kws
from fedjax_ext import privacy
from fedjax_ext.feduv import experiment
from ondevice import loop
from ondevice import options
from ondevice.data import registry
from ondevice.data import verification as verification_data

CONFIG_FILE = 'configs/feduv_kws.py'
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The variants get_config accepts, each run as shipped.
VARIANTS = ('smoke', 'smoke,backbone=ds_cnn_s')
# Rows of each variant: a FedUV variant gives one row per reference.
ROWS = {
    'smoke': ['central_softmax', 'fed_softmax', 'feduv', 'feduv_mean_ref',
              'fed_softmax_dp', 'feduv_dp', 'feduv_dp_mean_ref'],
    'smoke,backbone=ds_cnn_s': ['feduv', 'feduv_mean_ref'],
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """variant -> (workdir, results), each variant run once per module."""
  done = {}

  def get(variant):
    if variant not in done:
      workdir = tmp_path_factory.mktemp(variant.replace(',', '_'))
      config = feduv_kws.get_config(variant)
      done[variant] = (workdir, experiment.run(config, str(workdir)))
    return done[variant]

  return get


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize('variant', VARIANTS,
                         ids=[f'{CONFIG_FILE}:{v}' for v in VARIANTS])
def test_every_shipped_config_variant_runs(runs, variant):
  workdir, out = runs(variant)
  config = feduv_kws.get_config(variant)
  assert list(out['variants']) == ROWS[variant]
  for name, row in out['variants'].items():
    assert 0.0 <= row['eer'] <= 1.0, name
    assert (workdir / f'trials_{name}.npz').exists()
  with open(workdir / 'results.json') as f:
    assert list(json.load(f)['variants']) == ROWS[variant]
  assert (workdir / 'results.md').exists() and (workdir / 'roc.png').exists()
  # The sizes validation derives from the config are those of the splits.
  sizes = verification_data.check_config(config)
  assert out['num_users'] == sizes.num_users
  assert out['num_unseen_speakers'] == sizes.num_unseen
  assert out['utterances']['train'] == sizes.num_train
  assert out['utterances']['test'] == sizes.num_users * sizes.test_per_user
  # Each variant went through the shared loop in its own work directory.
  for name in config.variants.split(','):
    records = _jsonl(workdir / 'variants' / name / 'metrics.jsonl')
    unit, steps = (('step', config.central.num_steps)
                   if name == 'central_softmax'
                   else ('round', config.num_rounds))
    assert [r[unit] for r in records] == list(range(1, steps + 1))


FULL = ('', 'backbone=ds_cnn_s')


@pytest.mark.parametrize('variant', FULL,
                         ids=[f'{CONFIG_FILE}:{v}' for v in FULL])
def test_full_config_variants_validate(variant):
  names = experiment.validate_config(feduv_kws.get_config(variant))
  assert names == ['central_softmax', 'fed_softmax', 'feduv',
                   'fed_softmax_dp', 'feduv_dp']


def test_dp_rows_report_the_epsilon_of_fixed_size_cohorts(runs):
  workdir, out = runs('smoke')
  config = feduv_kws.get_config('smoke')
  users = out['num_users']
  expected = privacy.compute_epsilon(
      config.dp.noise_multiplier, config.cohort_size / users,
      config.num_rounds, config.dp.delta, sampling='without_replacement',
      population_size=users)
  for name in ('fed_softmax_dp', 'feduv_dp', 'feduv_dp_mean_ref'):
    assert out['variants'][name]['dp_epsilon'] == pytest.approx(expected)
  assert 'dp_epsilon' not in out['variants']['feduv']
  # Clip norm, noise std and epsilon are logged every round.
  records = _jsonl(workdir / 'variants' / 'feduv_dp' / 'metrics.jsonl')
  assert records[-1]['dp_epsilon'] == pytest.approx(expected)
  assert records[-1]['dp_clip_norm'] == pytest.approx(config.dp.clip_norm)
  # Update noise std = z * C / m for fixed clipping.
  assert records[0]['dp_noise_std'] == pytest.approx(
      config.dp.noise_multiplier * config.dp.clip_norm / config.cohort_size)


def test_rerun_resumes_every_variant_with_the_same_numbers(runs):
  workdir, out = runs('smoke')
  start = time.time()
  again = experiment.run(feduv_kws.get_config('smoke'), str(workdir))
  # Nothing trains again: every variant resumes at its last checkpoint.
  assert time.time() - start < 60
  for name, row in out['variants'].items():
    same = {k: v for k, v in row.items() if k not in loop.WALL_CLOCK_KEYS}
    assert {k: again['variants'][name][k] for k in same} == same, name
  with np.load(workdir / 'trials_feduv.npz') as z:
    assert z['genuine'].size == out['variants']['feduv']['num_genuine_trials']


def _set(config, dotted, value):
  with config.unlocked():
    options.set_value(config, dotted, value)


# ({dotted key: value} on the smoke config, text the error must contain).
# The smoke config has 8 seen users (10 speakers, 2 held out) with 36
# utterances each: round(0.2 * 36) = 7 test, 7 warm-up, 22 train; 176 train
# utterances in all.
BAD = [
    ({'central.batch_size': 0}, 'config.central.batch_size'),
    ({'central.batch_size': 177}, 'config.central.batch_size'),
    ({'central.num_steps': 0}, 'config.central.num_steps'),
    ({'central.optimizer': 'lbfgs'}, 'config.central.optimizer'),
    ({'central.learning_rate': -0.1}, 'config.central.learning_rate'),
    ({'central.log_every': 2, 'central.checkpoint_every': 3,
      'central.num_steps': 10}, 'config.central.checkpoint_every'),
    ({'eval_batch_size': 0}, 'config.eval_batch_size'),
    ({'dp.delta': 1.5}, 'config.dp.delta'),
    ({'dp.delta': 0.0}, 'config.dp.delta'),
    # Adaptive clipping at the defaults: sigma_b = 4 / 20 is below z / 2.
    ({'dp.adaptive': True}, 'config.dp.clipped_count_stddev'),
    ({'dp.noise_multiplier': -1.0}, 'config.dp.noise_multiplier'),
    ({'variants': 'feduv_dp', 'aggregator.name': 'median'},
     'config.aggregator.name'),
    ({'variants': 'feduv,arcface'}, 'config.variants'),
    ({'variants': ''}, 'config.variants'),
    ({'feduv_references': ('codewords',)}, 'config.feduv_references'),
    ({'feduv_margin': 0.0}, 'config.feduv_margin'),
    ({'feduv_margin': 1.5}, 'config.feduv_margin'),
    ({'target_tpr': 0.0}, 'config.target_tpr'),
    ({'fars': (0.01, 1.0)}, 'config.fars'),
    ({'code.m': 11}, 'config.code.m'),
    ({'code.t': 7}, 'config.code.t'),
    # BCH(15, 7): 8 users need 3 id bits, leaving 4 private bits.
    ({'code.min_random_bits': 5}, 'config.code.min_random_bits'),
    ({'embedding_dim': 0}, 'config.embedding_dim'),
    ({'logit_scale': 0.0}, 'config.logit_scale'),
    ({'quant': 'int3'}, 'config.quant'),
    ({'model': 'resnet'}, 'config.model'),
    ({'model_kwargs.hidden_units': (8,)}, 'config.model_kwargs'),
    ({'features': 'mfcc'}, 'config.features'),
    ({'model': 'ds_cnn_s', 'norm': 'group'}, "config.features='log_mel_stats'"),
    ({'data.name': 'fashion_mnist'}, 'config.data.name'),
    ({'data.utterances_per_word': 0}, 'config.data.utterances_per_word'),
    ({'split.test_fraction': 0.9}, 'config.split'),
    ({'cohort_size': 9}, 'config.cohort_size'),
    ({'algorithm.name': 'fedsgdx'}, 'config.algorithm.name'),
    ({'algorithm.fedavgm.momentum': 1.0}, 'config.algorithm.fedavgm.momentum'),
    ({'num_rounds': 0}, 'config.num_rounds'),
    ({'log_every': 0}, 'config.log_every'),
    ({'algorithm_kwargs': {'mu': 0.01}}, 'config.algorithm_kwargs'),
    ({'central.lr': 0.1}, 'config.central.lr'),
]


@pytest.mark.parametrize('overrides,match', BAD,
                         ids=[' '.join(f'{k}={v}' for k, v in o.items())
                              for o, _ in BAD])
def test_bad_config_is_rejected_before_data_loads(tmp_path, monkeypatch,
                                                  overrides, match):
  def no_data(*args, **kwargs):
    raise AssertionError('data loading started before validation')
  monkeypatch.setattr(registry, 'load_dataset', no_data)
  config = feduv_kws.get_config('smoke')  # configs/feduv_kws.py:smoke
  for key, value in overrides.items():
    _set(config, key, value)
  start = time.time()
  with pytest.raises(ValueError) as error:
    experiment.run(config, str(tmp_path))
  assert match in str(error.value)
  assert time.time() - start < 5.0


def _binary(module, *args):
  done = subprocess.run([sys.executable, '-m', module, *args],
                        capture_output=True, text=True, cwd=_ROOT,
                        check=False, timeout=300)
  return done.returncode, done.stderr


def test_the_binary_rejects_a_command_line_override_before_data(tmp_path):
  """experiments/feduv.py on configs/feduv_kws.py:smoke with a bad flag.

  A named part's option is a flag of the locked config; the error names it.
  """
  code, stderr = _binary('experiments.feduv',
                         f'--config={CONFIG_FILE}:smoke',
                         f'--workdir={tmp_path}',
                         '--config.algorithm.fedavgm.momentum=1.5')
  assert code != 0
  assert 'config.algorithm.fedavgm.momentum must be in [0, 1)' in stderr
  assert not (tmp_path / 'variants').exists()  # Nothing trained.


def test_the_combine_binary_merges_finished_runs(runs, tmp_path):
  workdir, out = runs('smoke')
  code, stderr = _binary('experiments.feduv_combine', f'--runs={workdir}',
                         f'--out={tmp_path}')
  assert code == 0, stderr
  with open(tmp_path / 'results.json') as f:
    merged = json.load(f)
  # The same rows (the resume test may have rerun the directory since).
  assert list(merged['variants']) == list(out['variants'])
  for name, row in out['variants'].items():
    for key in set(row) - set(loop.WALL_CLOCK_KEYS):
      assert merged['variants'][name][key] == row[key], (name, key)
  for name in out['variants']:
    assert (tmp_path / f'trials_{name}.npz').exists()
