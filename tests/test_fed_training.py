"""End-to-end tests of the federated run: resume, outputs, bad input."""
import json
import os

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant
import jax
import numpy as np
import optax
import pytest

from configs import fed_fmnist
from configs import fed_kws
from fedjax_ext import experiment
from fedjax_ext import federated_loop
from fedjax_ext import training
from ondevice import loop
from ondevice import models
from ondevice import train
from ondevice.data.base import ArrayDataset


def _clients(num_clients, per_client, seed):
  rng = np.random.default_rng(seed)
  n = num_clients * per_client
  x = rng.normal(size=(n, 6, 4)).astype(np.float32)
  y = (x[:, 0, 0] > 0).astype(np.int32)
  return ArrayDataset(x=x, y=y,
                      client_id=np.repeat(np.arange(num_clients), per_client
                                          ).astype(np.int32),
                      class_names=('neg', 'pos'))


def _config(**overrides):
  config = fed_kws.get_config('smoke')
  # The numbers below are for FedAvg, whatever the main job's default.
  config.algorithm.name = 'fedavg'
  config.server_learning_rate = 1.0
  config.model = 'mlp'
  config.norm = 'none'
  config.model_kwargs = {}
  config.num_rounds = 6
  config.cohort_size = 3
  config.local.num_steps = 2
  config.local.batch_size = 4
  config.max_examples_per_client = 12
  config.eval_every = 2
  config.checkpoint_every = 100
  for key, value in overrides.items():
    if key in ('algorithm', 'trainable'):
      config[key].name = value
    else:
      config[key] = value
  return config


def _data():
  return _clients(8, 10, 0), _clients(3, 10, 1)


@pytest.mark.parametrize('host_threads', [1, 2])
def test_resumed_federated_run_is_bit_identical(tmp_path, host_threads):
  config = _config(host_threads=host_threads)
  full = training.train_and_evaluate(config, str(tmp_path / 'a'),
                                     datasets=_data())
  assert full['metrics']['host_threads'] == host_threads
  part = training.train_and_evaluate(config, str(tmp_path / 'b'),
                                     datasets=_data(), stop_after_rounds=3)
  assert part['metrics'] == {'stopped_at': 3}
  resumed = training.train_and_evaluate(config, str(tmp_path / 'b'),
                                        datasets=_data())
  for a, b in zip(jax.tree.leaves(full['state']),
                  jax.tree.leaves(resumed['state'])):
    np.testing.assert_array_equal(a, b)
  assert int(resumed['state'].round) == 6
  with open(tmp_path / 'b' / 'metrics.jsonl') as f:
    rounds = [json.loads(line)['round'] for line in f]
  assert rounds == [1, 2, 3, 4, 5, 6]


def test_outputs_and_bytes_per_client(tmp_path):
  config = _config(num_rounds=30, cohort_size=4)
  config.compression.name = 'quantize'
  config.compression.quantize.bits = 8
  out = training.train_and_evaluate(config, str(tmp_path), datasets=_data())
  for name in ('metrics.jsonl', 'accuracy_vs_round.png', 'final_metrics.json'):
    assert os.path.getsize(tmp_path / name) > 0
  params = out['metrics']['num_params']
  assert out['metrics']['bytes_per_client_float32'] == 4 * params
  with open(tmp_path / 'metrics.jsonl') as f:
    record = json.loads(f.readline())
  # int8: one byte per param plus a float32 scale per leaf (4 leaves).
  assert record['bytes_per_client'] == params + 4 * 4
  # y = [x > 0] on one feature: far above chance after 30 rounds.
  assert out['metrics']['test_accuracy'] > 0.8
  with open(tmp_path / 'metrics.jsonl') as f:
    elapsed = [json.loads(line)['elapsed_seconds'] for line in f]
  # One wall-clock reading per round, taken after the round: 30 readings,
  # non-decreasing, all within the run's training time.
  assert len(elapsed) == 30
  assert all(b >= a for a, b in zip(elapsed, elapsed[1:]))
  assert 0 < elapsed[0] and elapsed[-1] <= out['metrics']['train_seconds']


def test_dp_run_reports_epsilon(tmp_path):
  config = _config(num_rounds=2)
  config.dp.enabled = True
  config.dp.noise_multiplier = 1.0
  config.dp.clip_norm = 0.5
  out = training.train_and_evaluate(config, str(tmp_path), datasets=_data())
  assert 0 < out['metrics']['dp_epsilon'] < 100
  assert out['metrics']['dp_delta'] == 1e-5


def test_host_threads_compose_with_dp_and_secure_aggregation(tmp_path):
  states, epsilons = [], []
  for threads in (1, 2):
    # 3 clients in 2 parts of 2. The parts' stacked updates are joined (the
    # padded copy dropped) before DP clips, masks and noises them at once.
    config = _config(num_rounds=3, host_threads=threads)
    config.dp.enabled = True
    config.dp.noise_multiplier = 0.5
    config.dp.clip_norm = 0.5
    config.secure_aggregation.enabled = True
    out = training.train_and_evaluate(config, str(tmp_path / str(threads)),
                                      datasets=_data())
    states.append(jax.tree.leaves(out['state']))
    epsilons.append(out['metrics']['dp_epsilon'])
  for one, split in zip(*states):
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6)
  assert epsilons[0] == epsilons[1]


@pytest.mark.parametrize('key,value,match', [
    ('cohort_size', 50, 'cohort_size'),
    ('algorithm', 'fedsgdx', 'config.algorithm'),
    ('client_learning_rate', -1.0, 'client_learning_rate'),
    ('model', 'nope', 'config.model'),
    ('trainable', 'biases', 'config.trainable'),
])
def test_bad_config_values_fail_before_compilation(tmp_path, monkeypatch, key,
                                                   value, match):
  def no_jit(*args, **kwargs):
    raise AssertionError('compilation started before validation')
  monkeypatch.setattr(jax, 'jit', no_jit)
  with pytest.raises(ValueError, match=match):
    training.train_and_evaluate(_config(**{key: value}), str(tmp_path),
                                datasets=_data())


def test_impossible_dp_setting_is_an_error(tmp_path):
  config = _config()
  config.dp.enabled = True
  config.dp.noise_multiplier = -1.0
  with pytest.raises(ValueError, match='noise_multiplier'):
    training.train_and_evaluate(config, str(tmp_path), datasets=_data())


def test_fmnist_without_partition_is_an_error(tmp_path):
  config = fed_fmnist.get_config('smoke')
  config.partition.kind = 'natural'
  train = _clients(4, 5, 0)
  train = ArrayDataset(x=train.x, y=train.y,
                       client_id=-np.ones(len(train.y), np.int32),
                       class_names=train.class_names)
  with pytest.raises(ValueError, match='partition'):
    training.train_and_evaluate(config, str(tmp_path), datasets=(train, train))


def test_bias_only_clients_train_and_send_only_biases(tmp_path):
  config = _config(num_rounds=2, trainable='bias_only')
  out = training.train_and_evaluate(config, str(tmp_path), datasets=_data())
  # MLP 24 -> 128 -> 2: bias_only trains both biases and the classifier's
  # kernel (the head): 128 + 2 + 128 * 2 = 386 float32 values.
  assert out['metrics']['bytes_per_client_float32'] == 4 * 386
  with open(tmp_path / 'metrics.jsonl') as f:
    assert json.loads(f.readline())['bytes_per_client'] == 4 * 386
  # The frozen hidden kernel is where initialisation left it.
  model = models.build_model('mlp', 2, norm='none')
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  init = train.init_state(model, optax.sgd(1.0), _data()[0].x[:1], init_key)
  server = train.flatten_params(out['state'].params)
  start = train.flatten_params(init.params)
  frozen = [p for p in server if p.startswith('hidden')
            and p.endswith('kernel')]
  assert frozen
  for path in frozen:
    np.testing.assert_array_equal(server[path], start[path])
  assert np.any(server['classifier/bias'] != start['classifier/bias'])
  with pytest.raises(ValueError, match='whole leaves'):
    training.train_and_evaluate(
        _config(num_rounds=1, trainable='sparse_channels'),
        str(tmp_path / 'sc'), datasets=_data())


def _without_wall_clock(record):
  return {k: v for k, v in record.items() if k not in loop.WALL_CLOCK_KEYS}


def test_killed_and_resumed_run_writes_the_same_files(tmp_path):
  # One of the three clients drops out every round, so the dropped-client
  # total (a loop counter) must survive the resume to match.
  full = training.train_and_evaluate(_config(dropout_rate=0.34),
                                     str(tmp_path / 'a'), datasets=_data())
  assert full['metrics']['clients_dropped'] == 6.0
  part = training.train_and_evaluate(_config(dropout_rate=0.34),
                                     str(tmp_path / 'b'), datasets=_data(),
                                     stop_after_rounds=4)
  assert part['metrics'] == {'stopped_at': 4}
  training.train_and_evaluate(_config(dropout_rate=0.34), str(tmp_path / 'b'),
                              datasets=_data())
  files = {}
  for run in ('a', 'b'):
    with open(tmp_path / run / 'metrics.jsonl') as f:
      rows = [_without_wall_clock(json.loads(line)) for line in f]
    with open(tmp_path / run / 'final_metrics.json') as f:
      files[run] = (rows, _without_wall_clock(json.load(f)))
  assert [r['round'] for r in files['b'][0]] == [1, 2, 3, 4, 5, 6]
  assert all(r['num_dropped'] == 1.0 for r in files['b'][0])
  assert files['a'] == files['b']


def _bn_config(noise):
  config = _config(num_rounds=1, cohort_size=3, norm='batch')
  config.dp.enabled = noise is not None
  config.dp.noise_multiplier = noise or 0.0
  config.dp.clip_norm = 1e6  # Never clips: noise 0 is then the plain mean.
  return config


def _one_round(config):
  train_ds, _, pool = experiment.load_clients(config, _data())
  parts = experiment.build_parts(config, train_ds, pool, {})
  step = federated_loop.make_round_step(parts.algorithm, train_ds, pool,
                                        config, parts.round_key)
  state, _ = step(parts.state, 0)
  return state


def test_dp_privatises_every_aggregated_leaf_including_batch_norm():
  # Three clients of ten examples each: the plain (unweighted) client mean
  # is what FedAvg without DP computes, in the clear.
  plain = _one_round(_bn_config(None))
  assert jax.tree.leaves(plain.model_state)  # Batch-norm statistics exist.
  noiseless = _one_round(_bn_config(0.0))
  noised = _one_round(_bn_config(1.0))
  for tree in ('params', 'model_state'):
    for mean, quiet, loud in zip(jax.tree.leaves(getattr(plain, tree)),
                                 jax.tree.leaves(getattr(noiseless, tree)),
                                 jax.tree.leaves(getattr(noised, tree))):
      # Without noise the private path computes the same mean ...
      np.testing.assert_allclose(quiet, mean, rtol=1e-4, atol=1e-5)
      # ... and with noise no element of any leaf equals it.
      assert np.all(np.asarray(loud) != np.asarray(mean))


def test_logged_epsilon_is_dp_accountings_for_sampling_without_replacement(
    tmp_path):
  config = _config(num_rounds=3)
  config.dp.enabled = True
  config.dp.noise_multiplier = 1.1
  config.dp.clip_norm = 0.5
  training.train_and_evaluate(config, str(tmp_path), datasets=_data())
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  for r, row in enumerate(rows, start=1):
    # 3 of the 8 clients, drawn without replacement, every round.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            8, 3, dp_accounting.GaussianDpEvent(1.1)), r)
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(event)
    assert row['dp_epsilon'] == pytest.approx(accountant.get_epsilon(1e-5),
                                              rel=1e-12)
    assert row['dp_clip_norm'] == 0.5
    # z * C / m with m the cohort size.
    assert row['dp_noise_std'] == pytest.approx(1.1 * 0.5 / 3, rel=1e-6)


def test_dp_without_noise_writes_epsilon_as_null(tmp_path):
  config = _config(num_rounds=2)
  config.dp.enabled = True
  config.dp.noise_multiplier = 0.0
  training.train_and_evaluate(config, str(tmp_path), datasets=_data())
  with open(tmp_path / 'final_metrics.json') as f:
    text = f.read()
  def reject(constant):
    raise AssertionError(f'{constant} is not JSON')
  final = json.loads(text, parse_constant=reject)
  assert 'dp_epsilon' in final and final['dp_epsilon'] is None
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line, parse_constant=reject) for line in f]
  assert all('dp_epsilon' not in row and row['dp_noise_std'] == 0.0
             for row in rows)


def _rows(path):
  with open(path / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def test_logged_update_norm_is_the_server_step_of_fedavg(tmp_path):
  # FedAvg with server rate 1 adds the aggregate to the params, so the norm
  # logged for round 2 is the distance between the round-1 and round-2 models.
  one = training.train_and_evaluate(_config(num_rounds=1), str(tmp_path / 'a'),
                                    datasets=_data())['state'].params
  two = training.train_and_evaluate(_config(num_rounds=2), str(tmp_path / 'b'),
                                    datasets=_data())['state'].params
  step = np.sqrt(sum(np.sum((np.asarray(b) - np.asarray(a)) ** 2)
                     for a, b in zip(jax.tree.leaves(one),
                                     jax.tree.leaves(two))))
  assert step > 0
  assert _rows(tmp_path / 'b')[1]['update_norm'] == pytest.approx(step,
                                                                  rel=1e-4)


@pytest.mark.parametrize('clip_norm,fraction', [(1e6, 1.0), (1e-6, 0.0)])
def test_logged_unclipped_fraction_counts_clients_under_the_clip(
    tmp_path, clip_norm, fraction):
  config = _config(num_rounds=2)
  config.dp.enabled = True
  config.dp.noise_multiplier = 0.5
  config.dp.clip_norm = clip_norm
  config.dp.clipped_count_stddev = 0.0  # The released count is exact.
  training.train_and_evaluate(config, str(tmp_path), datasets=_data())
  assert [row['dp_unclipped_fraction'] for row in _rows(tmp_path)] == [
      fraction, fraction]
