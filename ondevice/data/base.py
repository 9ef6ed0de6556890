"""The one array format every dataset in the codebase returns.

A dataset is a handful of NumPy arrays with a shared leading example axis.
Clients (speakers, Dirichlet partitions) are an integer column, not objects,
so that federated code can gather a cohort with fancy indexing and stack it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """Examples as arrays.

  Attributes:
    x: float32 features, shape [N, ...] (e.g. [N, 98, 40] log-mel, or
      [N, 28, 28, 1] images).
    y: int32 labels in [0, num_classes), shape [N].
    client_id: int32 client of each example (speaker, partition), shape [N];
      -1 where the dataset has no natural clients.
    class_names: name of each label.
    meta: per-example extra columns (e.g. 'accent_group', 'utterance'), each
      an array of shape [N].
    info: free-form dataset-level information (generation parameters, ...).
  """
  x: np.ndarray
  y: np.ndarray
  client_id: np.ndarray
  class_names: tuple[str, ...]
  meta: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    n = len(self.x)
    for name in ('y', 'client_id'):
      arr = getattr(self, name)
      if arr.shape != (n,):
        raise ValueError(f'ArrayDataset.{name} has shape {arr.shape}; '
                         f'expected ({n},) to match x with {n} examples.')
    for name, arr in self.meta.items():
      if len(arr) != n:
        raise ValueError(f'ArrayDataset.meta[{name!r}] has {len(arr)} rows; '
                         f'expected {n}.')
    if n and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
      raise ValueError(f'Labels must lie in [0, {len(self.class_names)}); '
                       f'got [{self.y.min()}, {self.y.max()}].')

  def __len__(self) -> int:
    return len(self.x)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def take(self, index: np.ndarray) -> 'ArrayDataset':
    """Returns the examples at `index` (an int array or a boolean mask)."""
    return dataclasses.replace(
        self, x=self.x[index], y=self.y[index],
        client_id=self.client_id[index],
        meta={k: v[index] for k, v in self.meta.items()})

  def clients(self) -> np.ndarray:
    """Sorted unique client ids."""
    return np.unique(self.client_id)


def split_by_client(ds: ArrayDataset, test_fraction: float,
                    seed: int) -> tuple[ArrayDataset, ArrayDataset]:
  """Splits so that every client lands wholly in train or wholly in test.

  Used for "held-out speakers" evaluation: no speaker of the test split was
  seen in training.

  Args:
    ds: dataset whose `client_id` column names the clients.
    test_fraction: fraction of clients (not examples) put in the test split.
    seed: NumPy seed of the client shuffle (data prep runs outside jit).

  Returns:
    (train, test) datasets.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must lie in (0, 1); got {test_fraction}.')
  clients = ds.clients()
  if len(clients) < 2:
    raise ValueError('split_by_client needs at least two clients; got '
                     f'{len(clients)}.')
  rng = np.random.default_rng(seed)
  shuffled = rng.permutation(clients)
  num_test = min(len(clients) - 1, max(1, round(test_fraction * len(clients))))
  test_mask = np.isin(ds.client_id, shuffled[:num_test])
  return ds.take(~test_mask), ds.take(test_mask)
