"""Federated rounds over several processes with `jax.distributed`.

Each process (one per host, or several on one host) runs the same program.
After `initialize`, `jax.devices()` lists every process's devices; a `Mesh`
over them with a 'clients' axis (`global_mesh`) lets the library's 'sharded'
execution strategy (`execution.py`) split a cohort's clients over all
processes, and the weighted mean over clients becomes one all-reduce.

Every process draws the same cohort (sampling is a function of the round
key only), but reads from its `ClientStore` only the clients that its own
devices hold (`global_cohort`, through
`jax.make_array_from_process_local_data`), so no process ever loads the
whole cohort, let alone the population.

The federated binary does all of this from `config.distributed`
(`options`; `fedjax_ext.experiment.run`): it joins before anything touches a
device, and only process 0 evaluates and writes the run's files
(`loop_workdir`).

On CPUs the cross-process collectives are Gloo's
(`jax_cpu_collectives_implementation`). Process 0 hosts the coordinator;
the others first wait (bounded) for its port to accept connections, because
JAX aborts the whole process, rather than raising, when registration with an
unreachable coordinator times out.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from fedjax_ext import algorithms
from fedjax_ext import client as client_lib
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import execution
from fedjax_ext import federated_loop
from fedjax_ext import rounds as rounds_lib
from ondevice import models
from ondevice import train
from ondevice.data import client_store

PyTree = Any


def parse_address(address: str) -> tuple[str, int]:
  """'host:port' -> (host, port); ValueError for anything else."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'coordinator address {address!r} must be host:port '
                     'with a port in [1, 65535], e.g. 127.0.0.1:12355.')
  return host, int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once `address` accepts TCP connections; TimeoutError if not."""
  host, port = parse_address(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise TimeoutError(
            f'The coordinator {address} could not be reached within '
            f'{timeout_s:g} s ({e}). Start process 0 (it hosts the '
            'coordinator) with the same --coordinator, check the host and '
            'port, or raise the timeout.') from e
      time.sleep(0.2)


def check_processes(num_processes: int, process_id: int,
                    cohort_size: int) -> None:
  """Config checks that need no JAX: process count, id, cohort split."""
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1; got {num_processes}.')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'process_id must lie in [0, {num_processes}); got '
                     f'{process_id}.')
  if cohort_size % num_processes:
    raise ValueError(
        f'The cohort of {cohort_size} clients does not divide over '
        f'{num_processes} processes; choose a cohort size that is a '
        f'multiple of {num_processes} (e.g. '
        f'{-(-cohort_size // num_processes) * num_processes}).')


def initialize(coordinator: str, num_processes: int, process_id: int,
               timeout_s: float = 60.0) -> None:
  """Joins (process 0: hosts) the coordinator; one process needs nothing.

  Args:
    coordinator: 'host:port' of process 0.
    num_processes: how many processes take part.
    process_id: this process's index in [0, num_processes).
    timeout_s: how long to wait for the coordinator and the other
      processes.

  Raises:
    ValueError: a malformed address or process id.
    TimeoutError: the coordinator was not reachable within `timeout_s`.
  """
  parse_address(coordinator)
  check_processes(num_processes, process_id, num_processes)
  if num_processes == 1:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if process_id != 0:
    wait_for_coordinator(coordinator, timeout_s)
  jax.distributed.initialize(coordinator, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=max(1, int(timeout_s)))
  logging.info('Process %d of %d: %d local of %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def options(**overrides) -> ml_collections.ConfigDict:
  """`config.distributed` of a run: one process unless `coordinator` is set.

  Fields: coordinator ('host:port' of process 0; '' runs one process),
  num_processes, process_id (this process), timeout_s (how long to wait for
  the coordinator and the other processes).
  """
  values = dict(coordinator='', num_processes=1, process_id=0,
                timeout_s=60.0)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def is_multiprocess(config) -> bool:
  """Whether `config.distributed` asks for more than one process."""
  dist = config.get('distributed', None)
  return dist is not None and bool(dist.get('coordinator', ''))


def initialize_from_config(config) -> None:
  """`initialize` with `config.distributed` (nothing for one process).

  Call it before anything touches JAX devices.
  """
  if not is_multiprocess(config):
    return
  dist = config.distributed
  initialize(dist.coordinator, dist.num_processes, dist.process_id,
             dist.timeout_s)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def _broadcast_text(text: str, size: int = 4096) -> str:
  """Process 0's `text` on every process."""
  data = text.encode()
  if len(data) > size:
    raise ValueError(f'{text[:80]!r}... is longer than {size} bytes.')
  buffer = np.frombuffer(data.ljust(size, b'\0'), np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return out.tobytes().rstrip(b'\0').decode()


@contextlib.contextmanager
def loop_workdir(workdir: str) -> Iterator[str]:
  """Where this process's training loop writes, for the run's duration.

  Process 0 writes into `workdir` (metrics, checkpoints, final metrics).
  Checkpoints are saved by every process together (orbax coordinates them,
  process 0 writing the files), so the other processes loop in a scratch
  directory, deleted afterwards, whose checkpoints/ is a link to process
  0's: they save into it with process 0 and resume from the same
  checkpoint, while their metrics go nowhere. Several machines therefore
  need process 0's workdir on a filesystem they all reach, as orbax does.
  """
  if jax.process_count() == 1:
    yield workdir
    return
  shared = _broadcast_text(os.path.abspath(workdir))
  if is_primary():
    yield workdir
    return
  scratch = tempfile.mkdtemp(prefix=f'process_{jax.process_index()}_')
  try:
    os.symlink(os.path.join(shared, 'checkpoints'),
               os.path.join(scratch, 'checkpoints'))
    yield scratch
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def host_round_step(step):
  """`step` whose state and metrics come back as host (NumPy) copies.

  Over several processes a round's outputs are global arrays that no one
  process can read; every process holds all of them (replicated), so each
  keeps a host copy for the loop to log, evaluate and checkpoint, and feeds
  it back into the next round.
  """

  def hosted(state, r: int):
    state, metrics = step(state, r)
    return host_tree(state), host_tree(metrics)

  return hosted


def global_mesh() -> Mesh:
  """Every process's devices on one 'clients' axis."""
  return Mesh(np.array(jax.devices()), (execution.CLIENT_AXIS,))


def local_positions(mesh: Mesh, cohort_size: int) -> np.ndarray:
  """Cohort positions held by this process's devices, in cohort order."""
  sharding = NamedSharding(mesh, PartitionSpec(execution.CLIENT_AXIS))
  index_map = sharding.addressable_devices_indices_map((cohort_size,))
  positions = set()
  for (block,) in index_map.values():
    positions.update(range(*block.indices(cohort_size)))
  return np.array(sorted(positions), np.int64)


def global_cohort(store: client_store.ClientStore, client_ids,
                  max_examples: int, key: jax.Array, mesh: Mesh
                  ) -> tuple[dict[str, jax.Array], jax.Array]:
  """The cohort as global arrays split over the mesh's 'clients' axis.

  Args:
    store: the population (each process opens it; only its rows are read).
    client_ids: [C] pool indices of the whole cohort, the same on every
      process.
    max_examples: M of the cohort.
    key: subsampling key (as in `ClientStore.gather`).
    mesh: mesh with a 'clients' axis over every process's devices.

  Returns:
    ({'x', 'y', 'mask'} with leading axis C, int32 [C] client ids), each
    sharded on its client axis; this process filled only its own clients.
  """
  client_ids = np.asarray(client_ids).reshape(-1)
  size = len(client_ids)
  num_devices = mesh.shape[execution.CLIENT_AXIS]
  if size % num_devices:
    raise ValueError(
        f'The cohort of {size} clients does not divide over the '
        f'{num_devices} devices of the mesh; choose a cohort size that is '
        f'a multiple of {num_devices}.')
  mine = local_positions(mesh, size)
  if len(mine) and np.any(np.diff(mine) != 1):
    raise ValueError(f'This process holds cohort positions {mine.tolist()}, '
                     'not one contiguous block; order the mesh devices by '
                     'process (as jax.devices() does).')
  local = store.gather(client_ids[mine], max_examples, key, positions=mine)
  sharding = NamedSharding(mesh, PartitionSpec(execution.CLIENT_AXIS))

  def to_global(part: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(
        sharding, part, (size,) + part.shape[1:])

  ids = client_ids[mine].astype(np.int32)
  return {k: to_global(v) for k, v in local.items()}, to_global(ids)


def host_tree(tree: PyTree) -> PyTree:
  """NumPy copy of a PyTree of fully replicated (global) arrays."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f'Array of shape {x.shape} is split over processes '
                         '(not replicated); gather it before copying.')
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def make_store_round_step(algorithm, store: client_store.ClientStore,
                          config, round_key: jax.Array,
                          mesh: Mesh | None = None):
  """`federated_loop.make_round_step` with clients read from a store.

  Round r uses the keys of `federated_loop.round_keys`. Uniform sampling is
  `ClientStore.sample` (the same distribution as `cohort.sample_clients`,
  at a cost that does not grow with the population, but other cohorts for
  a given key); size-weighted sampling (`config.weighted_sampling`) is
  `cohort.sample_clients` over `store.sizes`, which is linear in the
  population. Only the cohort's clients are then read from `store`: all of
  them with `mesh=None`, or, with a mesh over several processes' devices,
  only this process's share (`global_cohort`); every process draws the same
  cohort.

  Args:
    algorithm: an `(init, apply)` pair (with the 'sharded' execution on
      `mesh` when one is given).
    store: the training population.
    config: reads `cohort_size`, `max_examples_per_client` and
      `weighted_sampling` (False when absent).
    round_key: the run's round key.
    mesh: None (one process) or a mesh with a 'clients' axis.

  Raises:
    ValueError: a cohort larger than the population, or one that does not
      divide over the mesh's devices (naming `config.cohort_size`).
  """
  cohort_size = int(config.cohort_size)
  max_examples = int(config.max_examples_per_client)
  weighted = bool(config.get('weighted_sampling', False))
  if cohort_size > store.num_clients:
    raise ValueError(f'config.cohort_size={cohort_size} exceeds the '
                     f'{store.num_clients} clients of the store at '
                     f'{store.root!r}; lower it or build a larger store.')
  if mesh is not None and cohort_size % mesh.shape[execution.CLIENT_AXIS]:
    raise ValueError(
        f'config.cohort_size={cohort_size} does not divide over the '
        f'{mesh.shape[execution.CLIENT_AXIS]} devices of all processes; '
        'choose a multiple of the device count.')

  def step(state, r: int):
    sample_key, gather_key, apply_key = federated_loop.round_keys(
        round_key, r)
    ids = (np.asarray(cohort_lib.sample_clients(
        sample_key, store.sizes, cohort_size, weighted=True)) if weighted
           else store.sample(sample_key, cohort_size))
    if mesh is None:
      return algorithm.apply(state, store.gather(ids, max_examples,
                                                 gather_key), ids, apply_key)
    cohort, global_ids = global_cohort(store, ids, max_examples, gather_key,
                                       mesh)
    return algorithm.apply(state, cohort, global_ids, apply_key)

  return step


def run_rounds(algorithm, params: PyTree, store: client_store.ClientStore,
               config, *, key: jax.Array, mesh: Mesh | None = None
               ) -> tuple[PyTree, list[dict]]:
  """`config.num_rounds` rounds from `store` (no checkpoints, for tests).

  A checkpointed run passes `make_store_round_step` to `ondevice.loop`
  instead.

  Returns:
    (the server state, one dict of host metrics per round).
  """
  step = make_store_round_step(algorithm, store, config, key, mesh)
  state = algorithm.init(params)
  history = []
  for r in range(int(config.num_rounds)):
    state, metrics = step(state, r)
    history.append({k: float(v) for k, v in host_tree(metrics).items()})
  return state, history


def flat_params(state) -> dict[str, np.ndarray]:
  """The server params as a flat {path: host array} dict (for comparison)."""
  return host_tree(train.flatten_params(state.params))


def fedavg_on_store(store: client_store.ClientStore, config,
                    mesh: Mesh | None = None
                    ) -> tuple[dict[str, np.ndarray], list[dict]]:
  """FedAvg of an `ondevice.models` classifier on `store`, on `mesh`.

  Args:
    store: the population.
    config: `model` (preset name), `cohort_size`, `max_examples_per_client`,
      `num_rounds`, `local_steps`, `batch_size`, `learning_rate` (client
      SGD), `seed` (init; the rounds use seed + 1).
    mesh: the 'clients' mesh of the 'sharded' execution (None: one vmap in
      this process).

  Returns:
    (the final server params as flat host arrays, per-round metrics).
  """
  model = models.build_model(config.model, len(store.class_names))
  params = model.init(jax.random.key(config.seed),
                      np.zeros((1,) + store.feature_shape,
                               np.float32))['params']
  execution_config = (execution.ExecutionConfig('vmap') if mesh is None else
                      execution.ExecutionConfig('sharded', mesh=mesh))
  algorithm = algorithms.fedavg(
      train.classification_loss(model), optax.sgd(config.learning_rate),
      client_lib.LocalConfig(batch_size=config.batch_size,
                             num_steps=config.local_steps),
      rounds=rounds_lib.RoundConfig(execution=execution_config))
  state, history = run_rounds(algorithm, params, store, config,
                              key=jax.random.key(config.seed + 1), mesh=mesh)
  return flat_params(state), history
