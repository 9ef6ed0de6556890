"""The design's composition: every combination of the federated parts either
runs or is refused before training, with the reason.

The matrix is algorithm x quant mode x trainable scheme x DP x secure
aggregation x execution strategy. Every cell is validated (milliseconds
each); one run per algorithm, with the other parts rotating through their
values, covers every value of every part on a small MLP. The shipped
composed config, configs/fed_personalize_kws.py, runs through the binary.
"""
from __future__ import annotations

import itertools
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import fed_personalize_kws
from fedjax_ext import algorithms
from fedjax_ext import execution
from fedjax_ext import experiment
from ondevice import options
from ondevice.data import registry
from ondevice.data.base import ArrayDataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUANTS = ('none', 'int8_fwd_bwd_sr')
TRAINABLES = ('full', 'bias_only')
SWITCHES = (False, True)
EXECUTIONS = tuple(s for s in execution.STRATEGIES if s != 'sharded')


def _config(algorithm, quant, trainable, dp, secagg, strategy):
  config = fed_personalize_kws.get_config('smoke')
  config.algorithm.name = algorithm
  config.quant = quant
  config.trainable.name = trainable
  config.dp.enabled = dp
  config.secure_aggregation.enabled = secagg
  config.execution = strategy
  return config


MATRIX = list(itertools.product(sorted(algorithms.ALGORITHMS), QUANTS,
                                TRAINABLES, SWITCHES, SWITCHES, EXECUTIONS))


def test_every_combination_validates_or_names_its_reason():
  accepted, refused = 0, {}
  for cell in MATRIX:
    try:
      experiment.validate_config(_config(*cell))
      accepted += 1
    except ValueError as e:
      message = str(e)
      assert 'config.' in message, (cell, message)
      refused[cell] = message
  # Refusals are exactly the documented ones: streamed execution with DP or
  # SecAgg (both need every update at once) and SCAFFOLD with DP (its control
  # variates are not clipped).
  for (algorithm, _, _, dp, secagg, strategy), message in refused.items():
    reasons = []
    if strategy == 'streamed' and (dp or secagg):
      reasons.append('streamed')
    if algorithm == 'scaffold' and dp:
      reasons.append('scaffold')
    assert reasons, message
  assert accepted + len(refused) == len(MATRIX)
  assert accepted > len(MATRIX) // 2


def _clients(num_clients=8, per_client=24, seed=0):
  rng = np.random.default_rng(seed)
  n = num_clients * per_client
  y = rng.integers(0, 4, n).astype(np.int32)
  x = (rng.normal(size=(n, 6)) + y[:, None]).astype(np.float32)
  return ArrayDataset(x=x, y=y, client_id=np.repeat(np.arange(num_clients),
                                                    per_client).astype(np.int32),
                      class_names=tuple('abcd'))


def _small(config):
  """The same parts on a 2-layer MLP and synthetic clients."""
  config.model = 'mlp'
  config.model_kwargs = {'hidden': (8,)}
  config.personalize.enabled = False
  config.max_examples_per_client = 24
  return config


def _valid(cell) -> bool:
  try:
    experiment.validate_config(_config(*cell))
  except ValueError:
    return False
  return True


def _covering_rows():
  """One valid cell per algorithm, chosen greedily so that together they
  hold every value of every other part."""
  covered, rows = set(), []
  for algorithm in sorted(algorithms.ALGORITHMS):
    cells = [c for c in MATRIX if c[0] == algorithm and _valid(c)]
    best = max(cells, key=lambda c: len({(i, v) for i, v in enumerate(c)}
                                        - covered))
    covered |= {(i, v) for i, v in enumerate(best)}
    rows.append(best)
  return rows


ROWS = _covering_rows()


def test_the_covering_runs_reach_every_value():
  assert {r[0] for r in ROWS} == set(algorithms.ALGORITHMS)
  for index, values in enumerate((QUANTS, TRAINABLES, SWITCHES, SWITCHES,
                                  EXECUTIONS), start=1):
    assert {r[index] for r in ROWS} == set(values), index


@pytest.mark.parametrize('cell', ROWS, ids=['-'.join(map(str, r))
                                            for r in ROWS])
def test_a_valid_combination_trains(tmp_path, cell):
  config = _small(_config(*cell))
  data = _clients(), _clients(4, 24, seed=1)
  out = experiment.run(config, str(tmp_path), datasets=data)
  metrics = out['metrics']
  assert metrics['rounds'] == config.num_rounds
  assert np.isfinite(metrics['test_loss'])
  if cell[3]:  # DP: epsilon accounted.
    assert metrics['dp_epsilon'] > 0


def test_refused_before_any_data_loads(tmp_path, monkeypatch):
  def no_data(*args, **kwargs):
    raise AssertionError('data loaded before the config was validated')
  monkeypatch.setattr(registry, 'load_dataset', no_data)
  for changes, needle in (
      ({'execution': 'streamed'}, 'streamed'),
      ({'cohort_size': 1}, 'cohort_size'),
      ({'aggregator.name': 'median'}, 'aggregator'),
      ({'norm': 'batch'}, 'norm'),
      ({'algorithm.per_fedavg.variant': 'second'}, 'variant'),
      ({'algorithm.per_fedavg.alpha': 0.0}, 'alpha'),
      ({'personalize.k_shot': 0}, 'personalize.k_shot'),
      ({'init': str(tmp_path / 'nowhere')}, 'config.init'),
      ({'secure_aggregation.late_dropout_rate': 1.0}, 'late_dropout_rate')):
    config = fed_personalize_kws.get_config('smoke')
    for dotted, value in changes.items():
      options.set_value(config, dotted, value)
    with pytest.raises(ValueError, match=needle):
      experiment.run(config, str(tmp_path / 'run'))


def test_the_composed_config_runs_through_the_binary(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.federated',
       '--config=configs/fed_personalize_kws.py:smoke',
       f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / 'final_metrics.json') as f:
    metrics = json.load(f)
  assert metrics['algorithm'] == 'per_fedavg'
  assert metrics['dp_epsilon'] > 0
  for key in ('personalized_accuracy', 'global_accuracy',
              'personalized_detection_rate', 'global_detection_rate'):
    assert 0.0 <= metrics[key] <= 1.0, key
  # int8 deltas of the bias-only leaves: a quarter of their float32 bytes,
  # plus a scale per leaf.
  with open(tmp_path / 'metrics.jsonl') as f:
    sent = {json.loads(line)['bytes_per_client'] for line in f}
  assert len(sent) == 1
  assert sent.pop() < metrics['bytes_per_client_float32'] / 3


@pytest.mark.parametrize('variant', ['fed_reptile', 'fedavg'])
def test_the_composed_config_variants_run(tmp_path, variant):
  config = fed_personalize_kws.get_config(f'smoke,variant={variant}')
  out = experiment.run(config, str(tmp_path))
  assert out['metrics']['algorithm'] == variant
  assert 'personalized_accuracy' in out['metrics']
