"""A FedJAX federated dataset on disk as `config.data.name='fedjax_sqlite'`."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from configs import fed_fmnist
from fedjax_ext import experiment
from fedjax_ext import fedjax_interop


def _write(path, num_clients, seed):
  fedjax_interop.import_fedjax()
  from fedjax.core import sqlite_federated_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  builder = sqlite_federated_data.SQLiteFederatedDataBuilder(str(path))
  clients = []
  for c in range(num_clients):
    n = 6 + c
    y = rng.integers(0, 4, n)
    x = (rng.normal(size=(n, 5)) + y[:, None]).astype(np.float32)
    clients.append((f'client{c}'.encode(), {'x': x, 'y': y}))
  builder.add_many(clients)
  return sum(6 + c for c in range(num_clients))


def _config(tmp_path):
  config = fed_fmnist.get_config('smoke')
  config.data = ml_collections.ConfigDict(dict(
      name=experiment.FEDJAX_SQLITE, train_path=str(tmp_path / 'train.sqlite'),
      test_path=str(tmp_path / 'test.sqlite'), x_key='x', y_key='y',
      num_classes=0))
  config.partition.kind = 'natural'
  config.model = 'mlp'
  config.model_kwargs = {'hidden': (8,)}
  config.cohort_size = 3
  config.max_examples_per_client = 16
  return config


def test_a_fedjax_sqlite_dataset_trains_with_its_clients(tmp_path):
  n_train = _write(tmp_path / 'train.sqlite', 5, seed=0)
  n_test = _write(tmp_path / 'test.sqlite', 2, seed=1)
  config = _config(tmp_path)
  train_ds, test_ds = experiment.load_data(config.data)
  assert len(train_ds) == n_train and len(test_ds) == n_test
  assert sorted(set(train_ds.client_id)) == [0, 1, 2, 3, 4]
  assert train_ds.num_classes == test_ds.num_classes == 4
  out = experiment.run(config, str(tmp_path / 'run'))
  assert out['metrics']['num_train_clients'] == 5
  assert 0.0 <= out['metrics']['test_accuracy'] <= 1.0


@pytest.mark.parametrize('key,value,needle', [
    ('train_path', '/nonexistent.sqlite', 'config.data.train_path'),
    ('test_path', '', 'config.data.test_path'),
    ('num_classes', -1, 'config.data.num_classes'),
])
def test_bad_fedjax_data_fields_are_named(tmp_path, key, value, needle):
  _write(tmp_path / 'train.sqlite', 2, seed=0)
  _write(tmp_path / 'test.sqlite', 2, seed=1)
  config = _config(tmp_path)
  config.data[key] = value
  with pytest.raises(ValueError, match=needle):
    experiment.validate_config(config)
