"""Tests of fedjax_ext.distributed and scripts/launch_local.sh (loopback only)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_ext import algorithms
from fedjax_ext import client as client_lib
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import distributed
from fedjax_ext import federated_loop
from ondevice import models
from ondevice import train
from ondevice.data import client_store
from ondevice.data.base import ArrayDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'scripts', 'launch_local.sh')
WORKER = os.path.join(ROOT, 'scripts', 'multiprocess_fedavg.py')
# The two runs differ only in how the weighted sum of client deltas is
# ordered: one process sums 4 clients at once, two processes sum 2 each and
# add the partial sums (Gloo all-reduce). float32 addition is not
# associative, so params may differ by a few float32 spacings (ulps) of the
# largest param.
TOLERANCE_ULPS = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _store(root) -> client_store.ClientStore:
  return client_store.synthetic_store(str(root), 12, feature_shape=(6, 5),
                                      clients_per_shard=5, examples=(1, 6))


def _worker_args(store_dir, out) -> list[str]:
  return [sys.executable, WORKER, f'--store={store_dir}', '--cohort_size=4',
          '--max_examples=4', '--rounds=1', '--timeout_s=60', f'--out={out}',
          '--model=mlp_2k', '--local_steps=2', '--batch_size=2',
          '--learning_rate=0.05', '--seed=0']


def test_two_processes_match_one_process(tmp_path):
  store = _store(tmp_path / 'store')
  two = tmp_path / 'two.npz'
  log = open(tmp_path / 'launch.log', 'w+')
  launched = subprocess.Popen(
      [LAUNCH, '2', f'--port={_free_port()}', '--timeout=150', '--'] +
      _worker_args(tmp_path / 'store', two), stdout=log, stderr=log)
  # The one-process reference: the workers' flags, in this process, while
  # the two processes run.
  config = ml_collections.ConfigDict({
      'model': 'mlp_2k', 'cohort_size': 4, 'max_examples_per_client': 4,
      'num_rounds': 1, 'local_steps': 2, 'batch_size': 2,
      'learning_rate': 0.05, 'seed': 0})
  one, history = distributed.fedavg_on_store(store, config,
                                             distributed.global_mesh())
  returncode = launched.wait(timeout=170)
  log.seek(0)
  output = log.read()
  assert returncode == 0, output[-3000:]
  assert 'all 2 processes finished' in output
  got = np.load(two)
  assert sorted(got) == sorted(one) and len(one) == 4
  info = json.loads((tmp_path / 'two.json').read_text())
  assert info['process_count'] == 2 and info['device_count'] == 2
  assert info['rounds'][0]['num_aggregated'] == 4.0
  largest = max(float(np.max(np.abs(v))) for v in one.values())
  atol = TOLERANCE_ULPS * float(np.spacing(np.float32(largest)))
  for name, want in one.items():
    assert got[name].shape == want.shape
    np.testing.assert_allclose(got[name], want, rtol=0, atol=atol)
  # The round did move the params (else agreement would prove nothing).
  assert history[0]['update_norm'] > 1e-3


def test_unreachable_coordinator_times_out():
  address = f'127.0.0.1:{_free_port()}'  # Nobody listens there.
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=f'{address} could not be reached '
                     'within 0.5 s.*Start process 0'):
    distributed.initialize(address, num_processes=2, process_id=1,
                           timeout_s=0.5)
  assert time.monotonic() - start < 5


def test_reachable_coordinator_returns():
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    port = server.getsockname()[1]
    distributed.wait_for_coordinator(f'127.0.0.1:{port}', 2.0)


@pytest.mark.parametrize('args, message', [
    ((2, 0, 5), 'cohort of 5 clients does not divide over 2 processes.*'
                'multiple of 2 \\(e.g. 6\\)'),
    ((3, 1, 4), 'does not divide over 3 processes'),
    ((0, 0, 4), 'num_processes must be >= 1'),
    ((2, 2, 4), r'process_id must lie in \[0, 2\); got 2'),
    ((2, -1, 4), r'process_id must lie in \[0, 2\)'),
])
def test_bad_process_counts(args, message):
  with pytest.raises(ValueError, match=message):
    distributed.check_processes(*args)


@pytest.mark.parametrize('address', ['127.0.0.1', ':123', 'host:0',
                                     'host:70000', 'host:port'])
def test_bad_coordinator_address(address):
  with pytest.raises(ValueError, match='must be host:port'):
    distributed.parse_address(address)


def test_global_cohort_in_one_process_is_the_gather(tmp_path):
  store = _store(tmp_path)
  mesh = distributed.global_mesh()
  ids = np.array([9, 2, 5])
  cohort, global_ids = distributed.global_cohort(store, ids, 3,
                                                 jax.random.key(4), mesh)
  want = store.gather(ids, 3, jax.random.key(4))
  for name in want:
    np.testing.assert_array_equal(np.asarray(cohort[name]), want[name])
  assert np.asarray(global_ids).tolist() == [9, 2, 5]
  assert distributed.local_positions(mesh, 3).tolist() == [0, 1, 2]


def test_launch_script_names_the_failed_process():
  program = ['bash', '-c', 'case "$3" in --process_id=1) exit 3;; esac', 'x']
  out = subprocess.run([LAUNCH, '2', '--timeout=20', '--'] + program,
                       capture_output=True, text=True, timeout=40)
  assert out.returncode == 1
  assert 'process 1 (exit 3) failed' in out.stderr
  assert 'process 0' not in out.stderr.split('launch_local.sh:')[-1]


@pytest.mark.parametrize('argv', [['0', '--', 'true', 'x'],
                                  ['two', '--', 'true', 'x'],
                                  ['2', '--bogus=1', '--', 'true', 'x'],
                                  ['2']])
def test_launch_script_rejects_bad_usage(argv):
  out = subprocess.run([LAUNCH] + argv, capture_output=True, text=True,
                       timeout=20)
  assert out.returncode == 2, out.stderr


def _round_config(cohort_size=4):
  return ml_collections.ConfigDict({'cohort_size': cohort_size,
                                    'max_examples_per_client': 3,
                                    'num_rounds': 1})


def test_store_round_step_equals_an_in_memory_round(tmp_path):
  store = _store(tmp_path)
  arrays = store.to_arrays()
  ds = ArrayDataset(x=arrays['x'], y=arrays['y'],
                    client_id=arrays['client_id'],
                    class_names=store.class_names)
  model = models.build_model('mlp_2k', len(store.class_names))
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 5)))['params']
  algorithm = algorithms.fedavg(
      train.classification_loss(model), optax.sgd(0.1),
      client_lib.LocalConfig(batch_size=2, num_steps=2))
  key = jax.random.key(3)
  # The same round from the in-memory dataset, built by hand.
  sample_key, gather_key, apply_key = federated_loop.round_keys(key, 0)
  ids = store.sample(sample_key, 4)
  cohort = cohort_lib.gather_cohort(ds, ids, 3, gather_key)
  want, _ = algorithm.apply(algorithm.init(params), cohort, ids, apply_key)
  got, history = distributed.run_rounds(algorithm, params, store,
                                        _round_config(), key=key)
  assert len(history) == 1 and history[0]['num_clients'] == 4
  for name, value in train.flatten_params(want.params).items():
    np.testing.assert_array_equal(
        np.asarray(train.flatten_params(got.params)[name]), np.asarray(value))


def test_store_round_step_rejects_bad_cohorts(tmp_path):
  store = _store(tmp_path)
  with pytest.raises(ValueError, match='config.cohort_size=13 exceeds the 12'):
    distributed.make_store_round_step(None, store, _round_config(13),
                                      jax.random.key(0))
  with pytest.raises(ValueError, match=r'cohort size in \[1, 12\]'):
    store.sample(jax.random.key(0), 13)


def test_launch_script_prefixes_flags_and_numbers_arguments(tmp_path):
  program = ['bash', '-c', 'echo "$@" > "$0"', str(tmp_path / 'p{process_id}'),
             'arg_{process_id}']
  out = subprocess.run([LAUNCH, '2', '--port=1234',
                        '--flag_prefix=config.distributed.', '--'] + program,
                       capture_output=True, text=True, timeout=40)
  assert out.returncode == 0, out.stderr
  for i in range(2):
    assert (tmp_path / f'p{i}').read_text().split() == [
        f'arg_{i}', '--config.distributed.coordinator=127.0.0.1:1234',
        '--config.distributed.num_processes=2',
        f'--config.distributed.process_id={i}']


def test_one_process_options_need_no_coordinator(tmp_path):
  config = ml_collections.ConfigDict({'distributed': distributed.options()})
  assert not distributed.is_multiprocess(config)
  assert not distributed.is_multiprocess(ml_collections.ConfigDict())
  distributed.initialize_from_config(config)  # Nothing to join.
  with distributed.loop_workdir(str(tmp_path)) as where:
    assert where == str(tmp_path)
  config.distributed.coordinator = '127.0.0.1:1234'
  assert distributed.is_multiprocess(config)


def test_host_round_step_returns_host_arrays():
  def step(state, r):
    return {'w': jnp.asarray(state['w']) + r}, {'loss': jnp.float32(r)}

  state, metrics = distributed.host_round_step(step)({'w': np.ones(2)}, 3)
  assert isinstance(state['w'], np.ndarray) and state['w'].tolist() == [4, 4]
  assert isinstance(metrics['loss'], np.ndarray) and metrics['loss'] == 3.0
