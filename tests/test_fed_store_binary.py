"""The federated binary on a client store, in one process and in two.

configs/fed_store.py runs through `fedjax_ext.experiment.run` (the only thing
experiments/federated.py calls) on a small synthetic store: it trains the
same server params as the same clients given in memory, a round reads only
its cohort, evaluation reads only the held-out clients, bad store and
process settings are named before anything loads, and two processes started
by scripts/launch_local.sh end with the params of one process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import fed_kws
from configs import fed_store
from fedjax_ext import distributed
from fedjax_ext import experiment
from fedjax_ext import federated_loop
from ondevice import checkpoint
from ondevice import options
from ondevice import train
from ondevice.data import client_store
from ondevice.data import registry
from ondevice.data.base import ArrayDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'scripts', 'launch_local.sh')
NUM_CLIENTS, EVAL_CLIENTS = 30, 4
POPULATION = NUM_CLIENTS - EVAL_CLIENTS
# Two processes sum the 4 clients' weighted deltas as two partial sums of 2
# (one per process, then a Gloo all-reduce); one process sums all 4 at once.
# float32 addition is not associative, so each round's mean may differ in
# its last bits, and the next round starts from those params: allow a few
# float32 spacings (ulps) of the largest param per round.
TOLERANCE_ULPS_PER_ROUND = 8


def _store(root) -> client_store.ClientStore:
  return client_store.synthetic_store(
      str(root), NUM_CLIENTS, feature_shape=(6, 5), clients_per_shard=8,
      examples=(1, 6), num_classes=4)


@pytest.fixture(scope='module')
def store_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('store')
  _store(root)
  return str(root)


def _config(store: str, **overrides):
  config = fed_store.get_config('smoke')
  config.data.store = store
  config.data.eval_clients = EVAL_CLIENTS
  for key, value in overrides.items():
    options.set_value(config, key, value)
  return config


def _params(state) -> dict[str, np.ndarray]:
  return {k: np.asarray(v)
          for k, v in train.flatten_params(state.params).items()}


def _in_memory(store_dir: str) -> tuple[ArrayDataset, ArrayDataset]:
  """The store's clients as arrays: train = the first POPULATION clients."""
  store = client_store.open_store(store_dir)
  datasets = []
  for ids in (range(POPULATION), range(POPULATION, NUM_CLIENTS)):
    arrays = store.to_arrays(ids)
    datasets.append(ArrayDataset(
        x=arrays['x'], y=arrays['y'], client_id=arrays['client_id'],
        class_names=store.class_names))
  return tuple(datasets)


def test_store_run_equals_the_same_clients_in_memory(store_dir, tmp_path):
  # Size-weighted sampling draws cohorts with `cohort.sample_clients` in
  # both runs (uniform store cohorts use Floyd's algorithm instead), and
  # max_examples_per_client=4 < 6 makes both subsample clients. The data
  # are the store's own dequantised floats, the keys and the program are
  # the same, so the params must agree bit for bit.
  config = _config(store_dir, weighted_sampling=True,
                   max_examples_per_client=4, num_rounds=3)
  got = experiment.run(config, str(tmp_path / 'store'))
  want = experiment.run(config, str(tmp_path / 'memory'),
                        datasets=_in_memory(store_dir))
  assert got['metrics']['num_train_clients'] == POPULATION
  for name, value in _params(want['state']).items():
    np.testing.assert_array_equal(_params(got['state'])[name], value)
  assert got['metrics']['test_loss'] == want['metrics']['test_loss']
  # The rounds moved the params (else agreement would prove nothing).
  moved = experiment.run(_config(store_dir, num_rounds=1),
                         str(tmp_path / 'one'))
  assert any(np.max(np.abs(a - _params(moved['state'])[k])) > 1e-4
             for k, a in _params(got['state']).items())


def test_rounds_read_only_the_cohort_and_eval_only_held_out(
    store_dir, tmp_path, monkeypatch):
  gathered, read = [], []
  gather = client_store.ClientStore.gather
  client = client_store.ClientStore.client

  def spy_gather(self, client_ids, *args, **kwargs):
    gathered.append(np.asarray(client_ids).tolist())
    return gather(self, client_ids, *args, **kwargs)

  def spy_client(self, c):
    read.append(int(c))
    return client(self, c)

  monkeypatch.setattr(client_store.ClientStore, 'gather', spy_gather)
  monkeypatch.setattr(client_store.ClientStore, 'client', spy_client)
  config = _config(store_dir, num_rounds=3, cohort_size=5)
  out = experiment.run(config, str(tmp_path))
  assert out['metrics']['rounds'] == 3
  assert len(gathered) == 3  # One read per round, of its cohort only.
  for ids in gathered:
    assert len(ids) == 5 and len(set(ids)) == 5
    assert max(ids) < POPULATION  # Held-out clients never train.
  assert sorted(read) == list(range(POPULATION, NUM_CLIENTS))


def _partial_store(root) -> str:
  """A store whose build stopped after its first of two shards."""
  def make_shard(i):
    if i == 1:
      raise KeyboardInterrupt('interrupted')
    return [{'x': np.zeros((2, 6, 5), np.float32), 'y': np.zeros(2, int),
             'id': j} for j in range(3)]
  with pytest.raises(KeyboardInterrupt):
    client_store.build_store(
        str(root), 2, make_shard, feature_shape=(6, 5), class_names=('a',),
        quantizer=client_store.Quantizer.from_range(np.zeros(5), np.ones(5)))
  return str(root)


_DIST = {'distributed.coordinator': '127.0.0.1:12399',
         'distributed.num_processes': 2, 'distributed.process_id': 0}

# (overrides, text the error must contain); a store of None means the
# module's complete store, 'partial' one whose build was interrupted.
BAD = [
    ({'data.store': ''}, 'config.data.store'),
    ({'data.store': '/nonexistent/store'}, "config.data.store='/nonexistent"),
    ({'data.store': 'partial'}, 'build_store with the same arguments to '
     'resume'),
    ({'cohort_size': POPULATION + 1},
     f'config.cohort_size={POPULATION + 1} exceeds the population of '
     f'{POPULATION} training clients'),
    ({'data.eval_clients': NUM_CLIENTS}, 'config.data.eval_clients'),
    ({'data.eval_clients': 0}, 'config.data.eval_clients'),
    ({'partition': {'kind': 'iid', 'num_clients': 10}},
     'config.partition.kind'),
    ({**_DIST, 'distributed.num_processes': 3},
     'config.cohort_size=4 does not divide over '
     'config.distributed.num_processes=3'),
    ({**_DIST, 'execution': 'vmap'}, "config.execution='vmap'"),
    ({**_DIST, 'distributed.process_id': 2}, 'config.distributed.process_id'),
    ({**_DIST, 'distributed.coordinator': 'localhost'},
     'config.distributed.coordinator'),
    ({**_DIST, 'distributed.timeout_s': 0.0}, 'config.distributed.timeout_s'),
    ({'distributed.num_processes': 2}, 'config.distributed.num_processes'),
]


def _no_data(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('data loading or joining started before validation')
  for name in ('gather', 'client', 'to_arrays'):
    monkeypatch.setattr(client_store.ClientStore, name, refuse)
  monkeypatch.setattr(registry, 'load_dataset', refuse)
  monkeypatch.setattr(distributed, 'initialize', refuse)


@pytest.mark.parametrize('overrides,match', BAD,
                         ids=[' '.join(f'{k}={v}' for k, v in o.items())
                              for o, _ in BAD])
def test_bad_store_or_process_config_is_named_before_data_loads(
    store_dir, tmp_path, monkeypatch, overrides, match):
  overrides = dict(overrides)
  if overrides.get('data.store') == 'partial':
    overrides['data.store'] = _partial_store(tmp_path / 'partial')
  config = _config(store_dir)
  for key, value in overrides.items():
    if key == 'partition':
      config.partition = value
    else:
      options.set_value(config, key, value)
  _no_data(monkeypatch)
  start = time.time()
  with pytest.raises(ValueError) as error:
    experiment.run(config, str(tmp_path / 'run'))
  assert match in str(error.value)
  if 'partial' in str(overrides.get('data.store', '')):
    assert overrides['data.store'] in str(error.value)  # Names the path.
  assert time.time() - start < 5.0


def test_several_processes_need_a_store(tmp_path, monkeypatch):
  config = fed_kws.get_config('smoke')
  config.distributed = distributed.options(**{
      k.split('.')[1]: v for k, v in _DIST.items()})
  _no_data(monkeypatch)
  with pytest.raises(ValueError, match="config.data.name='speech_keywords' "
                     'with config.distributed.coordinator'):
    experiment.run(config, str(tmp_path))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_is_a_timeout(store_dir, tmp_path):
  address = f'127.0.0.1:{_free_port()}'  # Nobody listens there.
  config = _config(store_dir, **{**_DIST, 'distributed.coordinator': address,
                                 'distributed.process_id': 1,
                                 'distributed.timeout_s': 0.5})
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=f'{address} could not be reached '
                     'within 0.5 s'):
    experiment.run(config, str(tmp_path))
  assert time.monotonic() - start < 5
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def test_two_processes_of_the_binary_match_one_process(store_dir, tmp_path):
  """configs/fed_store.py:smoke, 2 processes via scripts/launch_local.sh."""
  rounds = 2
  log = open(tmp_path / 'launch.log', 'w+')
  launched = subprocess.Popen(
      [LAUNCH, '2', f'--port={_free_port()}', '--timeout=150',
       '--flag_prefix=config.distributed.', '--', sys.executable, '-m',
       'experiments.federated', '--config=configs/fed_store.py:smoke',
       f'--config.data.store={store_dir}',
       f'--config.data.eval_clients={EVAL_CLIENTS}',
       f'--config.num_rounds={rounds}',
       f'--workdir={tmp_path}/two_{{process_id}}'],
      stdout=log, stderr=log, cwd=ROOT)
  # The one-process reference, in this process while the two processes run.
  one = experiment.run(_config(store_dir, num_rounds=rounds),
                       str(tmp_path / 'one'))
  returncode = launched.wait(timeout=170)
  log.seek(0)
  output = log.read()
  assert returncode == 0, output[-3000:]
  primary, other = tmp_path / 'two_0', tmp_path / 'two_1'
  with open(primary / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['execution'] == 'sharded' and final['rounds'] == rounds
  # Only process 0 wrote the run; process 1 only claimed its workdir.
  assert sorted(os.listdir(other)) == ['.lock', 'config.json']
  zeros = {k: np.zeros((), np.float64) for k in federated_loop.COUNTERS}
  step, tree = checkpoint.Checkpointer(str(primary)).restore_latest(
      {'state': one['state'], 'totals': zeros})
  assert step == rounds
  want, got = _params(one['state']), _params(tree['state'])
  largest = max(float(np.max(np.abs(v))) for v in want.values())
  atol = rounds * TOLERANCE_ULPS_PER_ROUND * float(
      np.spacing(np.float32(largest)))
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=0, atol=atol)
  diff = max(float(np.max(np.abs(got[k] - v))) for k, v in want.items())
  print(f'2-process vs 1-process max |diff| {diff:.3g} (atol {atol:.3g})')
  assert final['test_loss'] == pytest.approx(one['metrics']['test_loss'],
                                             rel=1e-5)
