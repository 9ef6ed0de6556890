"""How a cohort's client updates are laid out on the hardware.

One function, `map_clients(fn, broadcast, per_client, config)`, maps a
per-client function over the leading client axis of `per_client` (the server
params in `broadcast` are shared) with one of four strategies:

* 'vmap': one `jax.vmap` over the whole cohort. Fastest while every client's
  params, gradients and activations fit in memory at once.
* 'chunked': `lax.map` over chunks of `chunk_size` vmapped clients, so only
  one chunk is live at a time: lower peak memory for big models or cohorts.
* 'sharded': the client axis is split over the 'clients' axis of a
  `jax.sharding.Mesh` (all local devices by default), with
  `vmap(..., spmd_axis_name='clients')` and sharding constraints on inputs
  and outputs, as in DrJAX (Rush et al. 2024, "DrJAX: Scalable and
  Differentiable MapReduce Primitives in JAX"). The weighted sum over clients
  that follows becomes an all-reduce. On several hosts, call
  `jax.distributed.initialize()` first and pass a mesh over `jax.devices()`
  (every host's devices); the cohort must then be a global array (e.g. built
  with `jax.make_array_from_process_local_data`).
* 'auto': the rule in `resolve_strategy`.

Cohorts whose size does not divide the chunk size or the device count are
padded with copies of their first client; the copies' outputs are dropped, so
every strategy returns exactly what 'vmap' returns. For 'sharded', pick a
cohort size divisible by the device count: dropping the copies of a padded
cohort makes XLA gather every client's outputs, while an even split keeps
them sharded and the aggregation is a single all-reduce.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

PyTree = Any
STRATEGIES = ('auto', 'vmap', 'chunked', 'sharded')
CLIENT_AXIS = 'clients'
# 'auto' keeps one vmap while params x cohort stays below this many scalars
# (2^26 floats = 256 MiB for one copy of every client's params; with
# gradients, optimiser state and activations a vmap holds several copies).
AUTO_VMAP_BUDGET = 2 ** 26


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """Which execution strategy a round uses.

  Attributes:
    strategy: one of STRATEGIES.
    chunk_size: clients per chunk for 'chunked' (None: from the budget).
    mesh: mesh with a 'clients' axis for 'sharded' (None: every device of
      `jax.devices()` on one 'clients' axis).
  """
  strategy: str = 'auto'
  chunk_size: int | None = None
  mesh: Mesh | None = None

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f'Unknown execution strategy {self.strategy!r}; '
                       f'choose one of {STRATEGIES}.')
    if self.chunk_size is not None and self.chunk_size < 1:
      raise ValueError(f'chunk_size must be >= 1 or None; got '
                       f'{self.chunk_size}.')
    if self.mesh is not None and CLIENT_AXIS not in self.mesh.axis_names:
      raise ValueError(f'The mesh has axes {self.mesh.axis_names}; sharded '
                       f"execution needs an axis named '{CLIENT_AXIS}'.")


def _balanced_chunk(cohort_size: int, max_chunk: int) -> int:
  """The smallest chunk size giving as few chunks as `max_chunk` does."""
  num_chunks = -(-cohort_size // max(1, min(max_chunk, cohort_size)))
  return -(-cohort_size // num_chunks)


def resolve_strategy(config: ExecutionConfig, param_count: int,
                     cohort_size: int, num_devices: int | None = None
                     ) -> tuple[str, int]:
  """Returns (strategy, chunk_size) for a round.

  The 'auto' rule:
    1. more than one device and at least one client per device: 'sharded';
    2. else if param_count * cohort_size > AUTO_VMAP_BUDGET: 'chunked' with
       chunks of about AUTO_VMAP_BUDGET // param_count clients (balanced so
       the last chunk is nearly full);
    3. else 'vmap'.
  chunk_size is only meaningful for 'chunked' (otherwise the cohort size).
  """
  if num_devices is None:
    num_devices = (config.mesh.shape[CLIENT_AXIS] if config.mesh is not None
                   else jax.device_count())
  strategy = config.strategy
  if strategy == 'auto':
    if num_devices > 1 and cohort_size >= num_devices:
      strategy = 'sharded'
    elif param_count * cohort_size > AUTO_VMAP_BUDGET:
      strategy = 'chunked'
    else:
      strategy = 'vmap'
  if strategy != 'chunked':
    return strategy, cohort_size
  max_chunk = config.chunk_size or max(1, AUTO_VMAP_BUDGET // max(param_count,
                                                                 1))
  return strategy, _balanced_chunk(cohort_size, max_chunk)


def _pad_clients(tree: PyTree, multiple: int) -> tuple[PyTree, int]:
  """Pads the client axis to a multiple with copies of client 0."""
  size = jax.tree.leaves(tree)[0].shape[0]
  padded = -(-size // multiple) * multiple
  if padded == size:
    return tree, size

  def pad(leaf):
    extra = jnp.broadcast_to(leaf[:1], (padded - size,) + leaf.shape[1:])
    return jnp.concatenate([leaf, extra], axis=0)

  return jax.tree.map(pad, tree), size


def client_mesh(config: ExecutionConfig) -> Mesh:
  """The mesh of sharded execution."""
  if config.mesh is not None:
    return config.mesh
  return Mesh(np.array(jax.devices()), (CLIENT_AXIS,))


def map_clients(fn: Callable[[PyTree, PyTree], PyTree], broadcast: PyTree,
                per_client: PyTree, config: ExecutionConfig,
                param_count: int) -> PyTree:
  """Maps `fn(broadcast, one_client) -> out` over the client axis.

  Args:
    fn: per-client function; sees one client's slice of `per_client`.
    broadcast: shared inputs (server params, model state).
    per_client: PyTree whose leaves all have the leading client axis C.
    config: the execution strategy.
    param_count: scalars in the model's params (for 'auto').

  Returns:
    `fn`'s outputs stacked on a leading axis of size C.
  """
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(per_client)}
  if len(sizes) != 1:
    raise ValueError(f'Per-client inputs disagree on the number of clients: '
                     f'{sorted(sizes)}.')
  cohort_size = sizes.pop()
  strategy, chunk = resolve_strategy(config, param_count, cohort_size)
  vmapped = jax.vmap(fn, in_axes=(None, 0))

  if strategy == 'vmap':
    return vmapped(broadcast, per_client)

  if strategy == 'chunked':
    padded, size = _pad_clients(per_client, chunk)
    chunks = jax.tree.map(
        lambda x: x.reshape((-1, chunk) + x.shape[1:]), padded)
    out = jax.lax.map(lambda c: vmapped(broadcast, c), chunks)
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:size], out)

  mesh = client_mesh(config)
  padded, size = _pad_clients(per_client, mesh.shape[CLIENT_AXIS])
  split = NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  padded = jax.lax.with_sharding_constraint(padded, split)
  broadcast = jax.lax.with_sharding_constraint(broadcast, replicated)
  out = jax.vmap(fn, in_axes=(None, 0), spmd_axis_name=CLIENT_AXIS)(
      broadcast, padded)
  out = jax.lax.with_sharding_constraint(out, split)
  return jax.tree.map(lambda x: x[:size], out)
