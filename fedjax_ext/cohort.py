"""Cohorts as arrays: sample clients, then stack their examples with a mask.

A federated round runs as one `jit(vmap(client_update))` call, so a cohort is a
PyTree whose leaves have a leading client axis C and a fixed example axis M:

    {'x': [C, M, ...], 'y': [C, M], 'mask': [C, M]}

Clients with fewer than M examples are padded (mask 0); clients with more are
subsampled without replacement with an explicit key, the way the "pmap path"
of FedJAX (Ro et al. 2021, "FedJAX: Federated learning simulation with JAX")
pads ragged clients, here on the client axis instead of across devices.

Client ids in this package are *dense pool indices* in [0, num_clients): the
position of a client in `ClientPool.dataset_ids`. Per-client server state
(SCAFFOLD's control variates) is indexed by them. Clients of the dataset with
zero examples (possible when `num_clients` is given, e.g. after a skewed
partition) are skipped and counted in `ClientPool.num_empty`; they get no pool
index and are never sampled.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ondevice.data.base import ArrayDataset

Cohort = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ClientPool:
  """Which examples belong to which client, computed once per dataset.

  Attributes:
    dataset_ids: [P] the dataset's `client_id` value of each pool client.
    sizes: [P] int32 number of examples of each pool client (all >= 1).
    order: example indices of the dataset grouped by pool client.
    offsets: [P + 1]; client i owns `order[offsets[i]:offsets[i + 1]]`.
    num_empty: clients of `range(num_clients)` without any example (skipped).
  """
  dataset_ids: np.ndarray
  sizes: np.ndarray
  order: np.ndarray
  offsets: np.ndarray
  num_empty: int = 0

  @property
  def num_clients(self) -> int:
    return len(self.dataset_ids)

  @classmethod
  def from_dataset(cls, ds: ArrayDataset,
                   num_clients: int | None = None) -> 'ClientPool':
    """Groups the examples of `ds` by its `client_id` column.

    Args:
      ds: a dataset whose `client_id` names the clients (speakers, Dirichlet
        partitions).
      num_clients: if given, ids must lie in [0, num_clients) and ids without
        examples are counted in `num_empty` (and skipped); if None, the pool
        is the ids present in `ds`.

    Raises:
      ValueError: for an empty dataset, ids of -1 (no natural clients), or
        ids outside [0, num_clients).
    """
    ids = np.asarray(ds.client_id)
    if ids.size == 0:
      raise ValueError('ClientPool.from_dataset got an empty dataset.')
    if ids.min() < 0:
      raise ValueError(
          'The dataset has client_id -1 (no natural clients); partition it '
          'first, e.g. with ondevice.data.partition.dirichlet_partition and '
          'assign_clients.')
    present = np.unique(ids)
    num_empty = 0
    if num_clients is not None:
      if ids.max() >= num_clients:
        raise ValueError(f'client_id {int(ids.max())} is outside [0, '
                         f'{num_clients}); pass num_clients > {ids.max()}.')
      num_empty = num_clients - len(present)
    order = np.argsort(ids, kind='stable').astype(np.int64)
    counts = np.searchsorted(ids[order], present, side='right')
    offsets = np.concatenate([[0], counts]).astype(np.int64)
    return cls(dataset_ids=present.astype(np.int32),
               sizes=np.diff(offsets).astype(np.int32), order=order,
               offsets=offsets, num_empty=int(num_empty))

  def examples_of(self, client: int) -> np.ndarray:
    """Dataset indices of pool client `client`."""
    if not 0 <= client < self.num_clients:
      raise ValueError(f'Client {client} is outside the pool [0, '
                       f'{self.num_clients}).')
    return self.order[self.offsets[client]:self.offsets[client + 1]]


def sample_clients(key: jax.Array, sizes, cohort_size: int,
                   weighted: bool = False) -> jax.Array:
  """Draws `cohort_size` distinct clients (sorted pool indices).

  Args:
    key: PRNG key of this round's sampling.
    sizes: [P] examples per client; clients of size 0 are never drawn.
    cohort_size: clients per round.
    weighted: False draws uniformly; True draws with probability
      proportional to size (successive sampling without replacement).

  Returns:
    int32 [cohort_size] pool indices, sorted.

  Raises:
    ValueError: when the cohort is larger than the non-empty pool.
  """
  if cohort_size < 1:
    raise ValueError(f'cohort_size must be >= 1; got {cohort_size}.')
  sizes = jnp.asarray(sizes, jnp.float32)
  if sizes.ndim != 1:
    raise ValueError(f'sizes must be a [num_clients] vector; got shape '
                     f'{sizes.shape}.')
  if not isinstance(sizes, jax.core.Tracer):
    available = int(jnp.sum(sizes > 0))
    if cohort_size > available:
      raise ValueError(
          f'Cohort of {cohort_size} clients is larger than the pool of '
          f'{available} clients with data; lower cohort_size to at most '
          f'{available}.')
  p = sizes if weighted else (sizes > 0).astype(jnp.float32)
  picked = jax.random.choice(key, sizes.shape[0], (cohort_size,),
                             replace=False, p=p / jnp.sum(p))
  return jnp.sort(picked).astype(jnp.int32)


def _key_to_rng(key: jax.Array) -> np.random.Generator:
  """A NumPy generator seeded by a JAX key (host-side subsampling)."""
  data = np.asarray(jax.random.key_data(key)).ravel()
  return np.random.default_rng([int(v) for v in data])


def stack_clients(clients: Sequence[Mapping[str, np.ndarray]],
                  max_examples: int, key: jax.Array) -> Cohort:
  """Pads (or subsamples) per-client {'x', 'y'} arrays into one cohort.

  Args:
    clients: one dict per client with 'x' [n_i, ...] and 'y' [n_i].
    max_examples: M, the example axis of the cohort.
    key: PRNG key of the subsampling of clients with more than M examples
      (client j uses `fold_in(key, j)`).

  Returns:
    {'x': [C, M, ...], 'y': [C, M] int32, 'mask': [C, M] float32}; the real
    examples of a client come first, in dataset order.

  Raises:
    ValueError: for no clients, M < 1, or clients whose feature shapes or
      dtypes differ (naming the first client that differs).
  """
  if not clients:
    raise ValueError('stack_clients got no clients.')
  if max_examples < 1:
    raise ValueError(f'max_examples must be >= 1; got {max_examples}.')
  first_x = np.asarray(clients[0]['x'])
  feature_shape, dtype = first_x.shape[1:], first_x.dtype
  xs = np.zeros((len(clients), max_examples) + feature_shape, dtype)
  ys = np.zeros((len(clients), max_examples), np.int32)
  mask = np.zeros((len(clients), max_examples), np.float32)
  for j, client in enumerate(clients):
    x, y = np.asarray(client['x']), np.asarray(client['y'])
    if x.shape[1:] != feature_shape or x.dtype != dtype:
      raise ValueError(
          f'Client {j} has examples of shape {x.shape[1:]} and dtype '
          f'{x.dtype}, but client 0 has {feature_shape} and {dtype}; every '
          f'client of a cohort must share one feature shape (resample or '
          f'pad features before federating).')
    if y.shape != x.shape[:1]:
      raise ValueError(f'Client {j} has {len(x)} inputs but labels of shape '
                       f'{y.shape}; expected ({len(x)},).')
    n = len(x)
    take = np.arange(n)
    if n > max_examples:
      take = np.sort(_key_to_rng(jax.random.fold_in(key, j)).choice(
          n, max_examples, replace=False))
    k = len(take)
    xs[j, :k], ys[j, :k], mask[j, :k] = x[take], y[take], 1.0
  return {'x': xs, 'y': ys, 'mask': mask}


def gather_cohort(ds: ArrayDataset, client_ids, max_examples: int,
                  key: jax.Array, pool: ClientPool | None = None) -> Cohort:
  """Stacks the examples of the given pool clients into a padded cohort.

  Args:
    ds: the dataset.
    client_ids: pool indices (e.g. from `sample_clients`).
    max_examples: M; larger clients are subsampled with `key`.
    key: PRNG key of the subsampling.
    pool: `ClientPool.from_dataset(ds)`; pass it to avoid regrouping the
      dataset every round.

  Returns:
    The cohort dict, see `stack_clients`.
  """
  pool = pool or ClientPool.from_dataset(ds)
  client_ids = np.asarray(client_ids).reshape(-1)
  if len(np.unique(client_ids)) != len(client_ids):
    raise ValueError(f'client_ids repeat a client: {client_ids.tolist()}; '
                     'sample without replacement.')
  clients = []
  for c in client_ids:
    index = pool.examples_of(int(c))
    clients.append({'x': ds.x[index], 'y': ds.y[index]})
  return stack_clients(clients, max_examples, key)


def validate_cohort(cohort: Mapping[str, jax.Array]) -> tuple[int, int]:
  """Checks the cohort layout; returns (num_clients C, max_examples M)."""
  missing = {'x', 'y', 'mask'} - set(cohort)
  if missing:
    raise ValueError(f'The cohort lacks keys {sorted(missing)}; build it with '
                     'gather_cohort or stack_clients.')
  mask_shape = np.shape(cohort['mask'])
  if len(mask_shape) != 2:
    raise ValueError(f"cohort['mask'] must be [clients, examples]; got shape "
                     f'{mask_shape}.')
  for name in ('x', 'y'):
    shape = np.shape(cohort[name])
    if shape[:2] != mask_shape:
      raise ValueError(
          f"cohort['{name}'] has leading shape {shape[:2]} but the mask has "
          f'{mask_shape}; every leaf must be [clients, examples, ...].')
  return mask_shape
