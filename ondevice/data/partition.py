"""Splits a centralised dataset into simulated clients.

A partition is an int32 client id per example, the `client_id` column of an
`ArrayDataset`, so it composes with `split_by_client` and with cohort
gathering by fancy indexing.

The non-IID split is the label-skew Dirichlet partition used by Yurochkin et
al. (2019), "Bayesian Nonparametric Federated Learning of Neural Networks",
and Hsu et al. (2019), "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification": for every class, client
shares are drawn from Dirichlet(alpha), so a small alpha gives each client
few classes and a large alpha approaches an IID split.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ondevice.data.base import ArrayDataset


def _check_labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D (one per example); got shape '
                     f'{labels.shape}.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integers; got dtype {labels.dtype}. '
                     'Pass ds.y, not one-hot or float labels.')
  if labels.size and labels.min() < 0:
    raise ValueError(f'labels must be >= 0; got {labels.min()}.')
  return labels


def _check_num_clients(num_clients: int, num_examples: int) -> None:
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1; got {num_clients}.')
  if num_clients > num_examples:
    raise ValueError(
        f'num_clients={num_clients} exceeds the {num_examples} examples, so '
        'some client would be empty; use fewer clients or more data.')


def iid_partition(labels: np.ndarray, num_clients: int,
                  seed: int) -> np.ndarray:
  """Shuffles examples into `num_clients` clients of near-equal size.

  Args:
    labels: [N] labels; only their count is used, so that both partitioners
      take the same leading arguments.
    num_clients: number of clients, at most N.
    seed: NumPy seed of the shuffle.

  Returns:
    int32 [N] client ids in [0, num_clients); sizes differ by at most one.
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, len(labels))
  rng = np.random.default_rng(seed)
  client_ids = np.empty(len(labels), np.int32)
  client_ids[rng.permutation(len(labels))] = (
      np.arange(len(labels)) % num_clients)
  return client_ids


def _draw_dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
                    rng: np.random.Generator) -> np.ndarray:
  """One draw of the per-class Dirichlet split."""
  client_ids = np.empty(len(labels), np.int32)
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    shares = rng.dirichlet(np.full(num_clients, alpha))
    # A multinomial gives integer counts summing to the class size exactly,
    # with expectation shares * size, unlike rounding cumulative shares.
    counts = rng.multinomial(len(members), shares)
    client_ids[members] = np.repeat(np.arange(num_clients, dtype=np.int32),
                                    counts)
  return client_ids


def _top_up(client_ids: np.ndarray, num_clients: int, min_examples: int,
            rng: np.random.Generator) -> np.ndarray:
  """Moves random examples from the largest clients to undersized ones."""
  client_ids = client_ids.copy()
  sizes = np.bincount(client_ids, minlength=num_clients)
  for client in np.flatnonzero(sizes < min_examples):
    while sizes[client] < min_examples:
      # Feasibility (N >= num_clients * min_examples) means the largest
      # client has a surplus while any client is short.
      donor = int(np.argmax(sizes))
      k = min(min_examples - sizes[client], sizes[donor] - min_examples)
      moved = rng.choice(np.flatnonzero(client_ids == donor), k,
                         replace=False)
      client_ids[moved] = client
      sizes[donor] -= k
      sizes[client] += k
  return client_ids


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                        seed: int, min_examples: int = 1,
                        max_resamples: int = 10) -> np.ndarray:
  """Label-skewed partition: per class, client shares ~ Dirichlet(alpha).

  Every example goes to exactly one client. A draw where some client has
  fewer than `min_examples` examples is redrawn (as in the reference code of
  the papers above), up to `max_resamples` times; if the last draw still
  falls short, random examples of the largest clients are moved to the short
  ones, which always succeeds when N >= num_clients * min_examples and
  barely changes the skew.

  Args:
    labels: [N] integer labels.
    num_clients: number of clients, at most N.
    alpha: Dirichlet concentration, > 0. 0.1 is strongly non-IID (a client
      sees one or two classes), 100 is close to IID.
    seed: NumPy seed; the same arguments give the same partition.
    min_examples: smallest allowed client size, >= 1.
    max_resamples: redraws before falling back to topping up.

  Returns:
    int32 [N] client ids in [0, num_clients).
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, len(labels))
  if not (np.isfinite(alpha) and alpha > 0):
    raise ValueError(f'alpha must be a positive finite number; got {alpha}. '
                     'Use e.g. 0.1 (strong skew) to 100 (near IID), or '
                     'iid_partition for an IID split.')
  if min_examples < 1:
    raise ValueError(f'min_examples must be >= 1; got {min_examples}.')
  if num_clients * min_examples > len(labels):
    raise ValueError(
        f'Cannot give each of {num_clients} clients {min_examples} examples '
        f'out of {len(labels)}; lower min_examples to at most '
        f'{len(labels) // num_clients} or use fewer clients.')
  if max_resamples < 0:
    raise ValueError(f'max_resamples must be >= 0; got {max_resamples}.')
  rng = np.random.default_rng(seed)
  for _ in range(max_resamples + 1):
    client_ids = _draw_dirichlet(labels, num_clients, alpha, rng)
    if np.bincount(client_ids, minlength=num_clients).min() >= min_examples:
      return client_ids
  return _top_up(client_ids, num_clients, min_examples, rng)


def assign_clients(ds: ArrayDataset, client_ids: np.ndarray) -> ArrayDataset:
  """Returns `ds` with its `client_id` column replaced by `client_ids`."""
  client_ids = np.asarray(client_ids)
  if client_ids.shape != (len(ds),):
    raise ValueError(f'client_ids has shape {client_ids.shape}; expected '
                     f'({len(ds)},), one id per example of the dataset.')
  if not np.issubdtype(client_ids.dtype, np.integer):
    raise ValueError(f'client_ids must be integers; got {client_ids.dtype}.')
  return dataclasses.replace(ds, client_id=client_ids.astype(np.int32))


def client_label_counts(labels: np.ndarray, client_ids: np.ndarray,
                        num_classes: int) -> np.ndarray:
  """[num_clients, num_classes] example counts, clients in sorted id order."""
  labels = _check_labels(labels)
  client_ids = np.asarray(client_ids)
  if client_ids.shape != labels.shape:
    raise ValueError(f'client_ids has shape {client_ids.shape}; expected '
                     f'{labels.shape} to match labels.')
  if client_ids.size and client_ids.min() < 0:
    raise ValueError('client_ids contains -1 (no client); partition the '
                     'dataset first, e.g. with dirichlet_partition.')
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f'labels reach {labels.max()}, but num_classes is '
                     f'{num_classes}; pass ds.num_classes.')
  _, client_index = np.unique(client_ids, return_inverse=True)
  counts = np.zeros((client_index.max(initial=-1) + 1, num_classes), np.int64)
  np.add.at(counts, (client_index, labels), 1)
  return counts


def label_skew(labels: np.ndarray, client_ids: np.ndarray,
               num_classes: int) -> float:
  """Mean total-variation distance of client label mixes from the global one.

  TV(p, q) = 0.5 * sum_k |p_k - q_k| lies in [0, 1]; each client counts once
  regardless of its size. IID partitions of large clients give about 0; a
  client holding a single class of C balanced classes gives 1 - 1/C.

  Args:
    labels: [N] integer labels.
    client_ids: [N] client ids, all >= 0.
    num_classes: number of classes.

  Returns:
    The mean over clients of TV(client label distribution, global one).
  """
  counts = client_label_counts(labels, client_ids, num_classes)
  if not counts.size:
    raise ValueError('label_skew needs at least one example.')
  global_dist = counts.sum(0) / counts.sum()
  client_dist = counts / counts.sum(1, keepdims=True)
  return float(np.mean(0.5 * np.abs(client_dist - global_dist).sum(1)))
