"""The federated binary's run on every shipped config, and bad configs.

Every variant of configs/fed_kws.py and configs/fed_fmnist.py runs end to end
through `fedjax_ext.experiment.run` (the only thing experiments/federated.py
calls); every bad value is rejected with a ValueError that names its key
before any data loads.
"""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fed_fmnist
from configs import fed_kws
from fedjax_ext import algorithms
from fedjax_ext import experiment
from fedjax_ext import training
from ondevice import options
from ondevice.data import registry

# Config file -> (module, the variants its get_config accepts).
CONFIG_FILES = {
    'configs/fed_kws.py': (fed_kws, ('smoke',)),
    'configs/fed_fmnist.py': (fed_fmnist, ('smoke',)),
}
RUNS = [(path, variant) for path, (_, variants) in CONFIG_FILES.items()
        for variant in variants]


@pytest.mark.parametrize('path,variant', RUNS)
def test_every_shipped_config_runs(tmp_path, path, variant):
  module, _ = CONFIG_FILES[path]
  config = module.get_config(variant)
  out = experiment.run(config, str(tmp_path))
  metrics = out['metrics']
  assert metrics['rounds'] == config.num_rounds
  assert 0.0 <= metrics['test_accuracy'] <= 1.0
  with open(tmp_path / 'final_metrics.json') as f:
    assert json.load(f)['rounds'] == config.num_rounds
  with open(tmp_path / 'metrics.jsonl') as f:
    rounds = [json.loads(line)['round'] for line in f]
  assert rounds == list(range(1, config.num_rounds + 1))


_set = options.set_value


# (config file, {dotted key: value}, text the error must contain).
BAD = [
    ('configs/fed_kws.py', {'algorithm.name': 'fedsgdx'},
     'config.algorithm.name'),
    ('configs/fed_kws.py', {'algorithm.name': 'fedprox',
                            'algorithm.fedprox.mu': -0.1},
     'config.algorithm.fedprox.mu'),
    ('configs/fed_kws.py', {'algorithm.fedadam.tau': 0.0},
     'config.algorithm.fedadam.tau'),
    ('configs/fed_kws.py', {'aggregator.name': 'mode'},
     'config.aggregator.name'),
    ('configs/fed_kws.py', {'aggregator.name': 'trimmed_mean',
                            'aggregator.trimmed_mean.trim_fraction': 0.7},
     'config.aggregator.trimmed_mean'),
    ('configs/fed_kws.py', {'aggregator.name': 'krum',
                            'aggregator.krum.num_byzantine': 2},
     'config.aggregator.krum.num_byzantine'),
    ('configs/fed_kws.py', {'aggregator.name': 'krum',
                            'aggregator.krum.num_byzantine': 0,
                            'aggregator.krum.multi_k': 9},
     'config.aggregator.krum.multi_k'),
    ('configs/fed_kws.py', {'compression.name': 'top_k',
                            'compression.top_k.fraction': 1.5},
     'config.compression.top_k'),
    ('configs/fed_kws.py', {'compression.name': 'quantize',
                            'compression.quantize.bits': 1},
     'config.compression.quantize'),
    ('configs/fed_kws.py', {'trainable.name': 'lite_residual'},
     'config.trainable.name'),
    ('configs/fed_kws.py', {'trainable.name': 'sparse_channels'},
     'config.trainable.name'),
    ('configs/fed_kws.py', {'trainable.name': 'last_k',
                            'trainable.last_k.k': 0},
     'config.trainable.last_k.k'),
    ('configs/fed_kws.py', {'eval_batch_size': 0}, 'config.eval_batch_size'),
    ('configs/fed_kws.py', {'dp.enabled': True, 'dp.delta': 1.5},
     'config.dp.delta'),
    ('configs/fed_kws.py', {'dp.enabled': True, 'dp.noise_multiplier': -1.0},
     'config.dp.noise_multiplier'),
    # Adaptive clipping at the defaults: sigma_b = 4 / 20 is below z / 2.
    ('configs/fed_kws.py', {'dp.enabled': True, 'dp.adaptive': True},
     'config.dp.clipped_count_stddev'),
    ('configs/fed_kws.py', {'dp.enabled': True, 'aggregator.name': 'median'},
     'config.aggregator.name'),
    ('configs/fed_kws.py', {'dp.enabled': True, 'algorithm.name': 'scaffold',
                            'client_momentum': 0.0},
     'config.dp.enabled'),
    ('configs/fed_kws.py', {'dp.enabled': True, 'weighted_sampling': True},
     'config.weighted_sampling'),
    ('configs/fed_kws.py', {'execution': 'streamed',
                            'aggregator.name': 'median'},
     "config.execution='streamed'"),
    ('configs/fed_kws.py', {'execution': 'pmap'}, 'config.execution'),
    ('configs/fed_kws.py', {'host_threads': 0}, 'config.host_threads'),
    ('configs/fed_kws.py', {'host_threads': 2, 'execution': 'sharded'},
     'config.host_threads'),
    ('configs/fed_kws.py', {'host_threads': 2, 'algorithm.name': 'scaffold',
                            'client_momentum': 0.0}, 'config.host_threads'),
    ('configs/fed_kws.py', {'algorithm.name': 'scaffold'},
     'config.client_momentum'),
    ('configs/fed_kws.py', {'algorithm.name': 'per_fedavg'}, 'config.norm'),
    ('configs/fed_kws.py', {'dropout_rate': 1.0}, 'config.dropout_rate'),
    ('configs/fed_kws.py', {'local.num_steps': 0, 'local.num_epochs': 0},
     'config.local.num_steps'),
    ('configs/fed_kws.py', {'quant': 'int3'}, 'config.quant'),
    ('configs/fed_kws.py', {'num_rounds': 0}, 'config.num_rounds'),
    ('configs/fed_kws.py', {'client_learning_rate': -1.0},
     'config.client_learning_rate'),
    ('configs/fed_kws.py', {'data.num_speakers': 1},
     'config.data.num_speakers'),
    ('configs/fed_fmnist.py', {'partition.alpha': 0.0},
     'config.partition.alpha'),
    ('configs/fed_fmnist.py', {'partition.kind': 'sorted'},
     'config.partition.kind'),
    ('configs/fed_fmnist.py', {'model': 'resnet'}, 'config.model'),
]


@pytest.mark.parametrize('path,overrides,match', BAD,
                         ids=[' '.join(f'{k}={v}' for k, v in o.items())
                              for _, o, _ in BAD])
def test_bad_config_is_rejected_before_data_loads(tmp_path, monkeypatch, path,
                                                  overrides, match):
  def no_data(*args, **kwargs):
    raise AssertionError('data loading started before validation')
  monkeypatch.setattr(registry, 'load_dataset', no_data)
  module, variants = CONFIG_FILES[path]
  config = module.get_config(variants[0])
  for key, value in overrides.items():
    _set(config, key, value)
  start = time.time()
  with pytest.raises(ValueError) as error:
    experiment.run(config, str(tmp_path))
  assert match in str(error.value)
  assert time.time() - start < 5.0


def test_unknown_top_level_key_is_named(tmp_path):
  config = fed_kws.get_config('smoke')
  config.algorithm_kwargs = {'mu': 0.01}  # The old place of the arguments.
  with pytest.raises(ValueError, match='algorithm_kwargs'):
    experiment.validate_config(config)


def test_fedprox_mu_and_multi_krum_reach_the_factories():
  config = fed_kws.get_config('smoke')
  config.algorithm.name = 'fedprox'
  config.algorithm.fedprox.mu = 0.01
  config.aggregator.name = 'krum'
  config.aggregator.krum.num_byzantine = 0
  config.aggregator.krum.multi_k = 2
  experiment.validate_config(config)
  name, _, kwargs = training.selected(config, 'algorithm',
                                      algorithms.ALGORITHMS)
  assert (name, kwargs) == ('fedprox', {'mu': 0.01})
  aggregate = training.rounds_config(config).aggregator
  # Krum scores with n - f - 2 = 2 neighbours: 0 -> 1 + 4, 1 -> 1 + 1,
  # 2 -> 1 + 4, 3 -> far. multi_k=2 averages client 1 and the first of the
  # tied clients 0 and 2: (1 + 0) / 2.
  deltas = {'w': jnp.array([[0.0], [1.0], [2.0], [100.0]])}
  out, _ = aggregate(deltas, jnp.ones(4), jax.random.key(0))
  np.testing.assert_allclose(out['w'], [0.5])


def test_binary_names_a_bad_flag_before_data_loads(tmp_path):
  """experiments/federated.py with configs/fed_kws.py:smoke and a bad flag."""
  command = [sys.executable, '-m', 'experiments.federated',
             '--config=configs/fed_kws.py:smoke',
             '--config.algorithm.name=fedprox',
             '--config.algorithm.fedprox.mu=-1.0',
             f'--workdir={tmp_path / "run"}']
  done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode != 0
  assert 'config.algorithm.fedprox.mu must be >= 0' in done.stderr
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()
