"""Federated clients read from a client store on disk, one cohort at a time.

`config.data.name='client_store'` runs the federated binary on a population
written by `ondevice.data.client_store.build_store` (or `synthetic_store`):

    config.data = ml_collections.ConfigDict(dict(
        name='client_store', store='/data/store', eval_clients=40))

The last `eval_clients` pool clients of the store are held out: they are
never sampled for training, and evaluation reads only them (into memory,
once). The training population is the rest, read per cohort through
`ClientStore.gather`, so a round reads its cohort's rows only and its cost
does not grow with the population.

`validate` opens the store (its manifest and per-client row offsets, no
examples) so that a missing, partly written or damaged store, and a cohort
larger than the population, are named before anything loads or compiles.
"""
from __future__ import annotations

import os

import ml_collections

from ondevice.data import client_store
from ondevice.data.base import ArrayDataset

NAME = 'client_store'
FIELDS = ('name', 'store', 'eval_clients')


def is_store(data) -> bool:
  """Whether `config.data` names a client store."""
  return data.get('name', None) == NAME


def open_checked(data) -> client_store.ClientStore:
  """The store of `config.data.store`; ValueError naming the key if unusable."""
  path = data.get('store', '')
  if not isinstance(path, str) or not path or not os.path.isdir(path):
    raise ValueError(
        f'config.data.store={path!r} is not a directory; build a client store '
        'with ondevice.data.client_store.build_store (or synthetic_store) and '
        'pass its directory.')
  try:
    return client_store.open_store(path)
  except client_store.StoreError as e:
    raise ValueError(f'config.data.store={path!r}: {e}') from None


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.data` of a store run and the cohort against its clients.

  Raises:
    ValueError: naming the config key, the bad value and the fix.
  """
  unknown = sorted(set(config.data) - set(FIELDS))
  if unknown:
    raise ValueError(f"config.data has fields {unknown} that name='{NAME}' "
                     f'does not read; it reads {list(FIELDS)}.')
  part = config.get('partition', None)
  if part is not None and part.get('kind', 'natural') != 'natural':
    raise ValueError(f"config.partition.kind={part.kind!r} with config.data."
                     f"name='{NAME}': a store's clients are its own; set "
                     "config.partition.kind='natural'.")
  store = open_checked(config.data)
  held_out = config.data.get('eval_clients', 0)
  if (isinstance(held_out, bool) or not isinstance(held_out, int) or
      not 1 <= held_out < store.num_clients):
    raise ValueError(
        f'config.data.eval_clients={held_out!r} must be an integer in [1, '
        f'{store.num_clients - 1}]: the last clients of the store at '
        f'{store.root!r} ({store.num_clients} clients) held out for '
        'evaluation.')
  population = store.num_clients - held_out
  if config.cohort_size > population:
    raise ValueError(
        f'config.cohort_size={config.cohort_size} exceeds the population of '
        f'{population} training clients in the store at {store.root!r} '
        f'({store.num_clients} clients, the last {held_out} held out by '
        'config.data.eval_clients); lower config.cohort_size or build a '
        'larger store.')


def load(data) -> tuple[client_store.ClientStore, ArrayDataset]:
  """(the training clients as a store view, the held-out clients in memory).

  Reads the held-out clients' examples only; training clients stay on disk.
  """
  store = open_checked(data)
  population = store.num_clients - data.eval_clients
  held_out = store.to_arrays(range(population, store.num_clients))
  test = ArrayDataset(x=held_out['x'], y=held_out['y'],
                      client_id=held_out['client_id'],
                      class_names=store.class_names,
                      info={'store': store.root,
                            'store_info': store.manifest.get('info', {})})
  return store.first(population), test
