"""How a cohort's client updates are laid out on the hardware.

`map_clients(fn, broadcast, per_client, config)` maps a per-client function
over the leading client axis of `per_client` (the server params in
`broadcast` are shared); `stream_clients` runs clients one after the other
and sums part of their output. Five strategies:

* 'vmap': one `jax.vmap` over the whole cohort. Fastest while every client's
  params, gradients and activations fit in memory at once.
* 'chunked': `lax.map` over chunks of `chunk_size` vmapped clients, so only
  one chunk is live at a time: lower peak memory for big models or cohorts.
* 'streamed': a `lax.scan` over the clients (or over chunks of `chunk_size`
  vmapped clients) that adds each client's weighted delta to a running sum
  as it finishes, so no [C, params] stack of deltas is ever built. Only for
  rounds whose aggregate is the weighted mean (`stream_clients`). On a CPU
  this is the fastest layout at every model size we measured: one client's
  params, gradients and activations stay in cache, where a vmap streams C
  copies through memory at every local step (FedAvg round of 100 clients x
  4 local steps on one core: 784-256-10 MLP 0.42 s vmapped, 0.087 s
  streamed; 20k-param CNN 3.4 s vs 1.7 s).
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

Host threads (`host_threads=T`, any strategy but 'sharded'): the cohort is
split into T equal parts (the last padded with copies of client 0 that weigh
nothing), each part runs as its own XLA computation dispatched from its own
Python thread, and one more computation combines them. XLA:CPU runs one
computation at a time per device and a small client step on one core, so
this is how a round uses a CPU's other cores. FedAvg rounds of 50 clients x
4 local steps of batch 8, streamed, on 2 cores, T = 1 -> 2: 25.3 -> 12.0 ms
for a 784-128-10 MLP, 10.5 -> 7.4 ms for 784-32-10, 259 -> 167 ms for a
5k-param stock CNN (benchmarks/results/fedjax_comparison). (Two devices from `jax_num_cpu_devices` do not help: one sharded
computation ran its devices' parts one after the other, 19.2 vs 18.9 ms.)
The parts' sums are added in part order, so the numbers depend on T, not on
the machine's core count; T = 1 is the single computation. Only algorithms
that build their round from `rounds.client_part` / `rounds.finish_round`
(`algorithms.fedopt` and its family) support T > 1, and their `apply` is
then a Python function that cannot be traced inside `jax.jit`.

What was resolved is logged (absl) and kept: `resolved_choices()` returns
the latest execution strategy, chunk size and client local loop chosen while
a round was traced (e.g. for a run's final metrics).

Cohorts whose size does not divide the chunk size or the device count are
padded with copies of their first client; the copies' outputs are dropped, so
every strategy returns exactly what 'vmap' returns. For 'sharded', pick a
cohort size divisible by the device count: dropping the copies of a padded
cohort makes XLA gather every client's outputs, while an even split keeps
them sharded and the aggregation is a single all-reduce.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

PyTree = Any
STRATEGIES = ('auto', 'vmap', 'chunked', 'streamed', 'sharded')
CLIENT_AXIS = 'clients'
# 'auto' keeps one vmap while params x cohort stays below this many scalars
# (2^26 floats = 256 MiB for one copy of every client's params; with
# gradients, optimiser state and activations a vmap holds several copies).
AUTO_VMAP_BUDGET = 2 ** 26
# 'auto' streams a CPU round only when one client's traced update costs at
# least this many FLOPs (XLA's cost analysis, loop bodies counted once).
# Below it, per-op overhead dominates and one vmap amortises it: FedAvg with
# a 2k-param MLP (64 kFLOP) ran 0.010 s/round vmapped vs 0.023 s streamed,
# while a 2k-param CNN (12.5 MFLOP) and a 200k-param MLP (4.9 MFLOP) ran
# 2-6x faster streamed (100 clients, 2-core CPU).
AUTO_STREAM_MIN_FLOPS = 1e6
# XLA convolutions: XLA:CPU runs them far more slowly inside a loop body (a
# scan over clients, a lax.map over chunks) than at the top level, so 'auto'
# vmaps clients whose update holds one (FedAvg rounds of 50 clients of
# stock flax CNNs on a CPU, local steps unrolled: vmapped 2-4x faster than
# streamed). With `LocalConfig.conv='auto'` (the default) a CPU client
# update has no XLA convolution left, and this rule does not apply.
CONV_PRIMITIVES = frozenset({'conv_general_dilated'})
# The latest resolved choices (see `resolved_choices`); written while tracing.
_RESOLVED: dict[str, Any] = {}


def record_choice(name: str, value: Any) -> None:
  """Keeps a choice resolved while tracing a round (`resolved_choices`)."""
  _RESOLVED[name] = value


def resolved_choices() -> dict[str, Any]:
  """The latest choices resolved while tracing a round.

  Keys (present once a round has been traced): 'execution' (the strategy
  'auto' or the config resolved to), 'chunk_size', 'local_loop' ('scan' or
  'unroll', see `client.resolve_loop`). Tracing is when the choice is made,
  so a run reads this after its first round to put it in its metrics.
  """
  return dict(_RESOLVED)


class ClientCost(float):
  """FLOPs of one client's update, and whether it holds XLA convolutions."""
  convolutions: bool = False

  def __new__(cls, flops: float, convolutions: bool = False):
    cost = super().__new__(cls, flops)
    cost.convolutions = convolutions
    return cost


def primitive_names(jaxpr) -> set[str]:
  """Names of the primitives of a jaxpr and of every jaxpr nested in it."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          names |= primitive_names(inner)
  return names


def _spec(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def traced_primitives(fn: Callable[..., Any], *args) -> set[str]:
  """The primitives `fn(*args)` runs (traced on abstract values)."""
  closed = jax.make_jaxpr(fn)(*jax.tree.map(_spec, args))
  return primitive_names(closed.jaxpr)


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """Which execution strategy a round uses.

  Attributes:
    strategy: one of STRATEGIES.
    chunk_size: clients per chunk for 'chunked' (None: from the budget) and
      'streamed' (None: 1).
    mesh: mesh with a 'clients' axis for 'sharded' (None: every device of
      `jax.devices()` on one 'clients' axis).
    host_threads: parts of the cohort run concurrently from this many host
      threads (see the module docstring); 1 runs the round as one
      computation.
  """
  strategy: str = 'auto'
  chunk_size: int | None = None
  mesh: Mesh | None = None
  host_threads: int = 1

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f'Unknown execution strategy {self.strategy!r}; '
                       f'choose one of {STRATEGIES}.')
    if self.chunk_size is not None and self.chunk_size < 1:
      raise ValueError(f'chunk_size must be >= 1 or None; got '
                       f'{self.chunk_size}.')
    if (not isinstance(self.host_threads, (int, np.integer)) or
        isinstance(self.host_threads, bool) or self.host_threads < 1):
      raise ValueError(f'host_threads must be an integer >= 1; got '
                       f'{self.host_threads!r}.')
    if self.host_threads > 1 and (self.strategy == 'sharded' or
                                  self.mesh is not None):
      raise ValueError(
          f'host_threads={self.host_threads} with sharded execution: a '
          'sharded round already spreads clients over devices; set '
          'host_threads=1, or use another strategy on one device.')
    if self.mesh is not None and CLIENT_AXIS not in self.mesh.axis_names:
      raise ValueError(f'The mesh has axes {self.mesh.axis_names}; sharded '
                       f"execution needs an axis named '{CLIENT_AXIS}'.")


def _balanced_chunk(cohort_size: int, max_chunk: int) -> int:
  """The smallest chunk size giving as few chunks as `max_chunk` does."""
  num_chunks = -(-cohort_size // max(1, min(max_chunk, cohort_size)))
  return -(-cohort_size // num_chunks)


def resolve_strategy(config: ExecutionConfig, param_count: int,
                     cohort_size: int, num_devices: int | None = None, *,
                     streamable: bool = False, backend: str | None = None,
                     client_flops: float | None = None
                     ) -> tuple[str, int]:
  """Returns (strategy, chunk_size) for a round.

  The 'auto' rule:
    1. more than one device and at least one client per device: 'sharded';
    2. else if the round can be streamed (`streamable`: its aggregate is the
       weighted mean), the backend is a CPU, one client's update is not
       tiny (`client_flops` unknown or >= AUTO_STREAM_MIN_FLOPS) and holds
       no XLA convolution (`client_flops.convolutions` of a ClientCost, see
       CONV_PRIMITIVES): 'streamed', one client at a time (see the module
       docstring for measurements);
    3. else if param_count * cohort_size > AUTO_VMAP_BUDGET: 'chunked' with
       chunks of about AUTO_VMAP_BUDGET // param_count clients (balanced so
       the last chunk is nearly full);
    4. else 'vmap'.
  chunk_size is only meaningful for 'chunked' and 'streamed' (otherwise the
  cohort size).

  Raises:
    ValueError: 'streamed' asked for a round that is not `streamable`.
  """
  if num_devices is None:
    num_devices = (config.mesh.shape[CLIENT_AXIS] if config.mesh is not None
                   else jax.device_count())
  if backend is None:
    backend = jax.default_backend()
  if config.strategy == 'streamed' and not streamable:
    raise ValueError(
        "execution 'streamed' sums weighted client deltas as clients finish, "
        'so it needs the default weighted-mean aggregation; this round has '
        'a custom or stateful aggregator (robust rules and DP need every '
        "client's delta at once). Use 'vmap', 'chunked' or 'auto'.")
  strategy, chunk = _resolve(config, param_count, cohort_size, num_devices,
                             streamable, backend, client_flops)
  logging.info('Execution %r resolved to %r (chunk_size %d, %d clients, %d '
               'devices, client FLOPs %s).', config.strategy, strategy, chunk,
               cohort_size, num_devices, client_flops)
  record_choice('execution', strategy)
  record_choice('chunk_size', chunk)
  return strategy, chunk


def _resolve(config, param_count, cohort_size, num_devices, streamable,
             backend, client_flops) -> tuple[str, int]:
  """`resolve_strategy` after the checks."""
  strategy = config.strategy
  if strategy == 'auto':
    if num_devices > 1 and cohort_size >= num_devices:
      strategy = 'sharded'
    elif (streamable and backend == 'cpu' and
          (client_flops is None or client_flops >= AUTO_STREAM_MIN_FLOPS) and
          not getattr(client_flops, 'convolutions', False)):
      strategy = 'streamed'
    elif param_count * cohort_size > AUTO_VMAP_BUDGET:
      strategy = 'chunked'
    else:
      strategy = 'vmap'
  if strategy == 'streamed':
    return strategy, _balanced_chunk(cohort_size, config.chunk_size or 1)
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


def split_clients(tree: PyTree, parts: int) -> tuple[list[PyTree], int]:
  """Splits the client axis into `parts` equal parts.

  The cohort is first padded to a multiple of `parts` with copies of client
  0 (`_pad_clients`), so every part has the same shape and one compiled
  computation serves them all.

  Returns:
    (the parts in order, clients per part).
  """
  padded, _ = _pad_clients(tree, parts)
  per_part = jax.tree.leaves(padded)[0].shape[0] // parts
  return [jax.tree.map(lambda x, i=i: x[i * per_part:(i + 1) * per_part],
                       padded) for i in range(parts)], per_part


def host_map(fn: Callable[[Any], Any], items: list[Any],
             pool: concurrent.futures.Executor | None) -> list[Any]:
  """[fn(item) for item in items], each call from a thread of `pool`.

  Each call blocks until its outputs are computed, so the threads' XLA
  computations run at the same time; results keep the order of `items`.
  None runs them one after the other on this thread.
  """
  def run(item):
    return jax.block_until_ready(fn(item))

  if pool is None or len(items) < 2:
    return [run(item) for item in items]
  return [f.result() for f in [pool.submit(run, item) for item in items]]


def require_concrete(tree: PyTree, what: str) -> None:
  """Raises if `tree` holds tracers (host threads cannot run under jit)."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
    raise ValueError(
        f'{what} with host_threads > 1 runs the round as several XLA '
        'computations from Python threads, so it cannot be traced (inside '
        'jax.jit, vmap or scan); call it outside, or set host_threads=1.')


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


def stream_clients(fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
                   broadcast: PyTree, per_client: PyTree,
                   chunk_size: int = 1) -> tuple[PyTree, PyTree]:
  """Runs `fn` client after client, summing one part of its output.

  Args:
    fn: `fn(broadcast, one_client) -> (to_sum, to_stack)`. `to_sum` (e.g.
      weight * delta) is added over clients as they finish; `to_stack`
      (small per-client outputs: weights, metrics) is stacked.
    broadcast: shared inputs (server params, model state).
    per_client: PyTree whose leaves all have the leading client axis C.
    chunk_size: clients run together (vmapped) per scan step; 1 runs them
      strictly one after the other (no vmap at all).

  Returns:
    (sum over the C clients of `to_sum`, `to_stack` stacked on axis 0).
    Clients padded in to fill the last chunk add nothing to the sum and are
    dropped from the stack.
  """
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(per_client)}
  if len(sizes) != 1:
    raise ValueError(f'Per-client inputs disagree on the number of clients: '
                     f'{sorted(sizes)}.')
  size = sizes.pop()
  one = jax.tree.map(lambda x: x[0], per_client)
  sum_shape, _ = jax.eval_shape(fn, broadcast, one)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sum_shape)

  if chunk_size == 1:
    def body(total, client):
      to_sum, to_stack = fn(broadcast, client)
      return jax.tree.map(jnp.add, total, to_sum), to_stack

    return jax.lax.scan(body, zeros, per_client)

  padded, _ = _pad_clients(per_client, chunk_size)
  chunks = jax.tree.map(
      lambda x: x.reshape((-1, chunk_size) + x.shape[1:]), padded)
  num_chunks = jax.tree.leaves(chunks)[0].shape[0]
  vmapped = jax.vmap(fn, in_axes=(None, 0))

  def chunk_body(total, inputs):
    index, chunk = inputs
    to_sum, to_stack = vmapped(broadcast, chunk)
    real = index * chunk_size + jnp.arange(chunk_size) < size

    def add(t, x):
      keep = real.reshape((-1,) + (1,) * (x.ndim - 1))
      return t + jnp.sum(jnp.where(keep, x, jnp.zeros_like(x)), axis=0)

    return jax.tree.map(add, total, to_sum), to_stack

  total, stacked = jax.lax.scan(chunk_body, zeros,
                                (jnp.arange(num_chunks), chunks))
  stacked = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:size],
                         stacked)
  return total, stacked


def client_flops(fn: Callable[[PyTree, PyTree], Any], broadcast: PyTree,
                 per_client: PyTree) -> ClientCost | None:
  """XLA's FLOP estimate of `fn` on one client (None if unavailable).

  Lowers (does not compile) `fn` on abstract values, so it also works while
  an outer function is being traced. The returned ClientCost also says
  whether `fn` holds an XLA convolution (for the 'auto' rule).
  """
  one = jax.tree.map(lambda x: _spec(x[0]), per_client)
  broadcast = jax.tree.map(_spec, broadcast)
  try:
    cost = jax.jit(fn).lower(broadcast, one).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Backends without a cost model: 'auto' ignores FLOPs.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  convolutions = bool(traced_primitives(fn, broadcast, one) &
                      CONV_PRIMITIVES)
  return ClientCost(float(cost['flops']), convolutions)
