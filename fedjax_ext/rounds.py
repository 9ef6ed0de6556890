"""One federated round on a stacked cohort: clients, faults, aggregation.

`run_round` maps a client update over the cohort's client axis (with the
strategy of `execution.py`), applies the per-client `transform` hook, drops
failed and non-finite clients, and calls the `aggregator` hook. The server
step that follows is the algorithm's (see `algorithms.py`).

`run_round` is `client_part` over the whole cohort followed by
`finish_round`. With `ExecutionConfig.host_threads > 1`, an algorithm cuts
the cohort with `split_round`, runs `client_part` on each part from its own
host thread and joins the parts with `finish_round` (execution.py).

Hook signatures (robust aggregation, compression and DP plug in here):

  ClientTransform: transform(delta, key) -> (delta, info)
    Runs on one client inside the vmap, after local training and before
    upload: clipping, quantisation, sparsification, DP clipping.
    delta: flat dict path -> array of one client's trainable leaves.
    key: that client's PRNG key (fold_in of the round's transform key and
      the client id).
    info: dict of scalars (e.g. 'bytes_sent', 'clipped'); round metrics
      report each as 'transform/<name>', its mean over aggregated clients.
    The returned delta must keep every leaf's shape and should keep its
    dtype. Must be pure and vmappable.

  Aggregator: aggregator(stacked_deltas, weights, key) -> (aggregate, metrics)
    Runs once per round on the server.
    stacked_deltas: flat dict path -> [C, ...] (transformed) client deltas.
      Rows of excluded clients (dropped, non-finite, no data) are zeros.
    weights: float32 [C]; 0 for every excluded client, else the client's
      number of examples (or 1 with `uniform_weights=True`). Aggregators
      must ignore rows of weight 0 (robust ones: treat them as absent).
    key: PRNG key of the round's aggregation (e.g. DP noise).
    aggregate: flat dict path -> array, the server's model delta (the
      algorithm applies it as a pseudo-gradient -aggregate).
    metrics: dict of scalars, reported as 'aggregator/<name>'.

  StatefulAggregator: an object with `init() -> agg_state` and
    `aggregate(agg_state, stacked_deltas, weights, key) -> (aggregate,
    agg_state, metrics)`, e.g. `privacy.dp_aggregator` (adaptive clipping).
    Its state lives in the server state's `aggregator_state` (arrays only,
    so it is checkpointed), advancing only in rounds that update the server.
    With `RoundConfig.private_model_state`, `stacked_deltas` also holds each
    client's model-state change (keys 'model_state::<i>', the i-th leaf of
    the model state), so DP clips and noises batch-norm statistics with the
    update and the server moves its statistics by their noised mean.

Faults (McMahan et al. 2017 simulate partial participation; Bonawitz et al.
2019, "Towards Federated Learning at Scale", report device dropout): a
`dropout_rate` fraction of the cohort, round(rate * C) clients chosen with the
round key, fails mid-round and its update never arrives. A client whose update
(raw or transformed) or model state holds NaN/Inf is excluded and counted in
'num_nonfinite_clients'. If no client is left, or the aggregate itself is not
finite, 'server_updated' is 0 and the algorithm keeps its params, model state
and optimiser state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_ext import client as client_lib
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import execution
from ondevice import train

PyTree = Any
FlatParams = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
ClientTransform = Callable[[FlatParams, jax.Array], tuple[FlatParams, Metrics]]
Aggregator = Callable[[FlatParams, jax.Array, jax.Array],
                      tuple[FlatParams, Metrics]]
# (server_params, model_state, client_data, key, context) -> ClientOutput
ClientFn = Callable[..., client_lib.ClientOutput]


def weigh(weight: jax.Array, x: jax.Array) -> jax.Array:
  """One client's term w * x of a weighted sum, in float32.

  `where`, not `w * x` alone: 0 * NaN is NaN, and a client of weight 0 (a
  non-finite one among them) must not reach the sum.
  """
  return jnp.where(weight > 0, weight * x.astype(jnp.float32), 0.0)


def mean_of_sum(total: jax.Array, total_weight: jax.Array,
                fallback: jax.Array) -> jax.Array:
  """sum_i w_i x_i / sum_i w_i in `fallback`'s dtype; `fallback` if no weight."""
  mean = total / jnp.maximum(total_weight, 1e-12)
  return jnp.where(total_weight > 0, mean.astype(fallback.dtype), fallback)


def masked_weighted_mean(tree: PyTree, weights: jax.Array, fallback: PyTree
                         ) -> PyTree:
  """The weighted mean over the leading client axis of every leaf.

  The one weighted mean of a round: `weighted_mean` (updates), the model
  state's mean, and the streamed strategy (which sums the same `weigh`
  terms client by client, then calls `mean_of_sum`) all come down to it.
  """
  total_weight = jnp.sum(weights)

  def mean(stacked, old):
    total = jnp.sum(jax.vmap(weigh)(weights, stacked), axis=0)
    return mean_of_sum(total, total_weight, old)

  return jax.tree.map(mean, tree, fallback)


def weighted_mean(stacked_deltas: FlatParams, weights: jax.Array,
                  key: jax.Array) -> tuple[FlatParams, Metrics]:
  """The default aggregator: sum_i w_i delta_i / sum_i w_i (0 if no weight)."""
  del key
  zeros = {k: jnp.zeros(v.shape[1:], v.dtype)
           for k, v in stacked_deltas.items()}
  return masked_weighted_mean(stacked_deltas, weights, zeros), {}


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Everything about a round except the client and server optimisers.

  Attributes:
    aggregator: see the module docstring; None is `weighted_mean`.
    stateful_aggregator: used instead of `aggregator` when it carries state
      across rounds (see the module docstring).
    transform: per-client hook, see the module docstring; None: identity.
    dropout_rate: fraction of the cohort that fails mid-round, in [0, 1).
    uniform_weights: weight every aggregated client 1 instead of its number
      of examples (as DP-FedAvg does).
    execution: how clients are laid out (vmap / chunked / sharded / auto).
    private_model_state: send each client's model-state change (batch-norm
      statistics) through the aggregator together with its update, so a
      private aggregator clips and noises both; False averages the model
      states in the clear. Needs an aggregator (DP-FedAvg).
  """
  aggregator: Aggregator | None = None
  stateful_aggregator: Any = None
  transform: ClientTransform | None = None
  dropout_rate: float = 0.0
  uniform_weights: bool = False
  execution: execution.ExecutionConfig = execution.ExecutionConfig()
  private_model_state: bool = False

  def __post_init__(self):
    if self.aggregator is not None and self.stateful_aggregator is not None:
      raise ValueError('RoundConfig got both aggregator and '
                       'stateful_aggregator; set only one.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'RoundConfig.dropout_rate must lie in [0, 1); got '
                       f'{self.dropout_rate}.')
    if self.private_model_state and (self.aggregator is None and
                                     self.stateful_aggregator is None):
      raise ValueError('RoundConfig.private_model_state needs the private '
                       'aggregator (e.g. privacy.dp_aggregator) that clips '
                       'and noises the model-state change; set one.')


class RoundKeys(NamedTuple):
  """The independent streams one round key is split into."""
  clients: jax.Array
  dropout: jax.Array
  transform: jax.Array
  aggregate: jax.Array


def init_aggregator_state(config: RoundConfig) -> PyTree:
  """The server's initial `aggregator_state` (() without a stateful one)."""
  if config.stateful_aggregator is None:
    return ()
  return config.stateful_aggregator.init()


def split_round_key(key: jax.Array) -> RoundKeys:
  return RoundKeys(*jax.random.split(key, 4))


def client_key(clients_key: jax.Array, client_id: jax.Array) -> jax.Array:
  """A client's key depends on its id, not its position in the cohort."""
  return jax.random.fold_in(clients_key, client_id)


class RoundResult(NamedTuple):
  """What the server sees after a round, before its own update.

  Attributes:
    aggregate: flat dict path -> the aggregated model delta.
    model_state: weighted mean of the aggregated clients' model states (the
      server's own when none was aggregated).
    included: bool [C], the clients whose update was aggregated.
    updated: bool scalar; False means the server must keep its state.
    extras: the clients' `ClientOutput.extras`, stacked on axis 0.
    aggregator_state: the stateful aggregator's new state (() if none).
    metrics: round metrics (see `run_round`).
  """
  aggregate: FlatParams
  model_state: PyTree
  included: jax.Array
  updated: jax.Array
  extras: PyTree
  aggregator_state: PyTree
  metrics: Metrics


def _all_finite(tree: PyTree) -> jax.Array:
  ok = jnp.array(True)
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok &= jnp.all(jnp.isfinite(leaf))
  return ok


def _dropped(key: jax.Array, cohort_size: int, rate: float) -> jax.Array:
  num_drop = int(round(rate * cohort_size))
  if num_drop == 0:
    return jnp.zeros(cohort_size, bool)
  order = jax.random.permutation(key, cohort_size)
  return jnp.zeros(cohort_size, bool).at[order[:num_drop]].set(True)


class ClientPart(NamedTuple):
  """What the clients of one part of a cohort hand to `finish_round`.

  Attributes:
    summed: for a streamed round, the weighted sums {'sent', 'model_state',
      'weight'} over the part's clients; None otherwise.
    out: per-client outputs stacked on axis 0 (for a round that is not
      streamed, their 'sent' updates and 'model_state's too).
  """
  summed: PyTree
  out: dict[str, Any]


def arrivals(key: jax.Array, num_clients: int, config: RoundConfig
             ) -> jax.Array:
  """bool [C]: the clients whose update arrives (see `dropout_rate`)."""
  return ~_dropped(split_round_key(key).dropout, num_clients,
                   config.dropout_rate)


def client_part(client_fn: ClientFn, params: PyTree, model_state: PyTree,
                cohort: Mapping[str, jax.Array], client_ids: jax.Array | None,
                arrived: jax.Array, key: jax.Array, config: RoundConfig,
                context: PyTree = None) -> ClientPart:
  """Runs the clients of `cohort` (all of a round's, or one part of them).

  Args: as `run_round`'s, plus `arrived` (bool [C], from `arrivals` over the
  whole cohort, sliced like `cohort`). `key` is the round's key, the same
  for every part: each client's randomness comes from its id.
  """
  num_clients, _ = cohort_lib.validate_cohort(cohort)
  keys = split_round_key(key)
  per_client = _per_client_inputs(cohort, client_ids, num_clients, keys,
                                  context, config)
  one_client = _make_one_client(client_fn, config)
  strategy, chunk = _strategy(config, one_client, params, model_state,
                              per_client, num_clients)
  if strategy == 'streamed':
    return ClientPart(*_streamed_clients(one_client, params, model_state,
                                         per_client, arrived, chunk, config))
  out = execution.map_clients(one_client, (params, model_state), per_client,
                              config.execution, _param_count(params))
  return ClientPart(None, out)


def _join_parts(parts: list[ClientPart], num_clients: int):
  """(summed over parts or None, outputs concatenated, padding dropped)."""
  if len({p.summed is None for p in parts}) != 1:
    raise ValueError('Parts of one round were run with different execution '
                     'strategies (streamed and not); give every part the '
                     'same number of clients.')
  if len(parts) == 1:
    return parts[0].summed, parts[0].out
  summed = parts[0].summed
  if summed is not None:
    for part in parts[1:]:  # In part order: the sum does not depend on timing.
      summed = jax.tree.map(jnp.add, summed, part.summed)
  out = jax.tree.map(lambda *xs: jnp.concatenate(xs)[:num_clients],
                     *[p.out for p in parts])
  return summed, out


def finish_round(params: PyTree, model_state: PyTree,
                 parts: list[ClientPart], arrived: jax.Array,
                 key: jax.Array, config: RoundConfig,
                 aggregator_state: PyTree = ()) -> RoundResult:
  """Aggregates the parts of a round (in order) into its RoundResult.

  `arrived` covers the whole cohort (C clients); the parts, in cohort order,
  cover at least C clients (clients past C are padding and are dropped).
  """
  summed, out = _join_parts(list(parts), arrived.shape[0])
  weights = _client_weights(out, arrived, config)
  if summed is not None:
    aggregated = _mean_of_sums(summed, params, model_state, aggregator_state)
  else:
    aggregated = _aggregate(config, model_state, out, weights,
                            split_round_key(key).aggregate, aggregator_state)
  aggregate, new_model_state, new_agg_state, agg_metrics = aggregated
  updated = (jnp.sum(weights) > 0) & _all_finite(aggregate)
  new_agg_state = jax.tree.map(lambda n, o: jnp.where(updated, n, o),
                               new_agg_state, aggregator_state)
  metrics = _round_metrics(out, weights, arrived, aggregate, updated,
                           agg_metrics)
  return RoundResult(aggregate=aggregate, model_state=new_model_state,
                     included=weights > 0, updated=updated,
                     extras=out['extras'], aggregator_state=new_agg_state,
                     metrics=metrics)


def run_round(client_fn: ClientFn, params: PyTree, model_state: PyTree,
              cohort: Mapping[str, jax.Array], client_ids: jax.Array | None,
              key: jax.Array, config: RoundConfig,
              context: PyTree = None,
              aggregator_state: PyTree = ()) -> RoundResult:
  """Runs every client of the cohort and aggregates their updates.

  Args:
    client_fn: `(params, model_state, client_data, key, context) ->
      ClientOutput`, e.g. from `client.make_client_update`.
    params: the server's params (broadcast to all clients).
    model_state: the server's model state.
    cohort: {'x': [C, M, ...], 'y': [C, M], 'mask': [C, M]}.
    client_ids: int32 [C] pool indices (None: 0..C-1); they key each
      client's randomness.
    key: this round's PRNG key.
    config: hooks, faults and execution.
    context: optional per-client PyTree with a leading C axis.
    aggregator_state: the stateful aggregator's state, if one is set.

  Returns:
    A RoundResult. Its metrics: num_clients, num_dropped,
    num_nonfinite_clients, num_empty_clients, num_aggregated, total_weight,
    server_updated, train_loss, train_accuracy, train_examples,
    mean_local_steps, update_norm, aggregator/*, transform/*.

  Raises:
    ValueError: `config.execution.host_threads > 1`; a round run from host
      threads is built from `split_round`, `client_part` and `finish_round`
      outside of jit, as `algorithms.fedopt` does.
  """
  if config.execution.host_threads != 1:
    raise ValueError(
        f'run_round runs a round as one computation, but its config asks '
        f'for host_threads={config.execution.host_threads}; run the parts '
        'with split_round / client_part / finish_round from host threads '
        '(see algorithms.fedopt), or set host_threads=1.')
  execution.record_choice('host_threads', 1)
  num_clients, _ = cohort_lib.validate_cohort(cohort)
  arrived = arrivals(key, num_clients, config)
  part = client_part(client_fn, params, model_state, cohort, client_ids,
                     arrived, key, config, context)
  return finish_round(params, model_state, [part], arrived, key, config,
                      aggregator_state)


def split_round(cohort: Mapping[str, jax.Array], client_ids: jax.Array | None,
                key: jax.Array, config: RoundConfig, parts: int,
                context: PyTree = None):
  """A cohort cut into `parts` equal parts for `client_part`.

  Returns:
    (arrived over the whole cohort, a list of per-part dicts with keys
    'cohort', 'client_ids', 'arrived' and 'context'). The last part is padded
    with copies of client 0 that never arrive (so they weigh nothing);
    `finish_round` drops their outputs.
  """
  num_clients, _ = cohort_lib.validate_cohort(cohort)
  if client_ids is None:
    client_ids = jnp.arange(num_clients, dtype=jnp.int32)
  arrived = arrivals(key, num_clients, config)
  tree = {'cohort': dict(cohort), 'client_ids': jnp.asarray(client_ids),
          'context': context, 'arrived': arrived}
  pieces, per_part = execution.split_clients(tree, parts)
  # Padding copies client 0, whose arrival must not be copied with it.
  for i, piece in enumerate(pieces):
    real = num_clients - i * per_part
    if real < per_part:
      piece['arrived'] = piece['arrived'] & (jnp.arange(per_part) < real)
  return arrived, pieces


def _param_count(params: PyTree) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def _per_client_inputs(cohort, client_ids, num_clients, keys: RoundKeys,
                       context, config: RoundConfig) -> dict[str, Any]:
  """What is mapped over the client axis: data, keys and context."""
  if client_ids is None:
    client_ids = jnp.arange(num_clients, dtype=jnp.int32)
  if jnp.shape(client_ids) != (num_clients,):
    raise ValueError(f'client_ids has shape {jnp.shape(client_ids)}; the '
                     f'cohort has {num_clients} clients.')
  per_client = {
      'data': dict(cohort),
      'key': jax.vmap(client_key, (None, 0))(keys.clients, client_ids),
      'context': context,
  }
  if config.transform is not None:
    # Only drawn when used: every PRNG call site adds compile time on CPU.
    per_client['transform_key'] = jax.vmap(client_key, (None, 0))(
        keys.transform, client_ids)
  return per_client


def _make_one_client(client_fn: ClientFn, config: RoundConfig):
  """One client: local update, transform, and a zero update if non-finite."""

  def one_client(broadcast, inputs):
    server_params, server_state = broadcast
    out = client_fn(server_params, server_state, inputs['data'],
                    inputs['key'], inputs['context'])
    finite = _all_finite(out.delta) & _all_finite(out.model_state)
    sent, info = out.delta, {}
    if config.transform is not None:
      sent, info = config.transform(out.delta, inputs['transform_key'])
      finite &= _all_finite(sent)
    sent = jax.tree.map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)),
                        sent)
    return {'sent': sent, 'finite': finite, 'weight': out.weight,
            'metrics': out.metrics, 'model_state': out.model_state,
            'info': info, 'extras': out.extras}

  return one_client


def _strategy(config: RoundConfig, one_client, params, model_state,
              per_client, num_clients) -> tuple[str, int]:
  """The execution strategy and chunk size (`execution.resolve_strategy`)."""
  streamable = (config.aggregator is None and
                config.stateful_aggregator is None)
  flops = None
  if (streamable and config.execution.strategy == 'auto' and
      jax.default_backend() == 'cpu'):
    flops = execution.client_flops(one_client, (params, model_state),
                                   per_client)
  return execution.resolve_strategy(
      config.execution, _param_count(params), num_clients,
      streamable=streamable, client_flops=flops)


def _weight(weight, finite, arrived, config: RoundConfig) -> jax.Array:
  """A client's aggregation weight: 0 unless arrived, finite and with data."""
  included = arrived & finite & (weight > 0)
  base = jnp.ones_like(weight) if config.uniform_weights else weight
  return jnp.where(included, base, 0.0).astype(jnp.float32)


def _client_weights(out, arrived, config: RoundConfig) -> jax.Array:
  return _weight(out['weight'], out['finite'], arrived, config)


def _streamed_clients(one_client, params, model_state, per_client, arrived,
                      chunk, config: RoundConfig):
  """(weighted sums, stacked small outputs), summed as clients finish."""

  def streamed_client(broadcast, inputs):
    out = one_client(broadcast, inputs)
    w = _weight(out['weight'], out['finite'], inputs['arrived'], config)
    to_sum = {'sent': jax.tree.map(lambda x: weigh(w, x), out.pop('sent')),
              'model_state': jax.tree.map(lambda x: weigh(w, x),
                                          out.pop('model_state')),
              'weight': w}
    return to_sum, out

  return execution.stream_clients(
      streamed_client, (params, model_state),
      {**per_client, 'arrived': arrived}, chunk)


def _mean_of_sums(summed, params, model_state, aggregator_state):
  """The streamed round's weighted mean (see execution.py)."""
  total = summed['weight']
  flat = train.flatten_params(params)
  aggregate = {k: mean_of_sum(x, total, jnp.zeros_like(flat[k]))
               for k, x in summed['sent'].items()}
  new_model_state = jax.tree.map(lambda m, old: mean_of_sum(m, total, old),
                                 summed['model_state'], model_state)
  return aggregate, new_model_state, aggregator_state, {}


_MODEL_STATE_PREFIX = 'model_state::'


def _aggregate(config: RoundConfig, model_state, out, weights, key,
               aggregator_state):
  """(aggregate, model state, aggregator state, metrics) from stacked outputs.

  With `private_model_state`, each client's model-state change rides along
  with its update through the aggregator (clipped and noised with it), and
  the server's model state moves by the aggregated change.
  """
  included = weights > 0
  sent = jax.tree.map(
      lambda d: jnp.where(included.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0),
      out['sent'])
  state_leaves, state_def = jax.tree_util.tree_flatten(model_state)
  private = config.private_model_state and bool(state_leaves)
  if private:
    client_leaves = jax.tree_util.tree_leaves(out['model_state'])
    for i, (client, server) in enumerate(zip(client_leaves, state_leaves)):
      change = jnp.where(
          included.reshape((-1,) + (1,) * server.ndim),
          client - server[None], 0).astype(server.dtype)
      sent[f'{_MODEL_STATE_PREFIX}{i}'] = change
  if config.stateful_aggregator is not None:
    aggregate, new_agg_state, agg_metrics = (
        config.stateful_aggregator.aggregate(aggregator_state, sent, weights,
                                             key))
  else:
    aggregate, agg_metrics = (config.aggregator or weighted_mean)(
        sent, weights, key)
    new_agg_state = aggregator_state
  if not private:
    new_model_state = masked_weighted_mean(out['model_state'], weights,
                                           model_state)
    return aggregate, new_model_state, new_agg_state, agg_metrics
  changes = [aggregate.pop(f'{_MODEL_STATE_PREFIX}{i}')
             for i in range(len(state_leaves))]
  moved = [jnp.where(jnp.sum(weights) > 0, s + c, s).astype(s.dtype)
           for s, c in zip(state_leaves, changes)]
  new_model_state = jax.tree_util.tree_unflatten(state_def, moved)
  return aggregate, new_model_state, new_agg_state, agg_metrics


def _round_metrics(out, weights, arrived, aggregate, updated, agg_metrics
                   ) -> Metrics:
  """The round's scalar metrics (see `run_round`)."""
  included = weights > 0  # arrived, finite and has data.
  reported = arrived & out['finite']  # Clients whose metrics are counted.

  def as_f32(flags):
    return jnp.sum(flags.astype(jnp.float32))

  def report_sum(name):
    if name not in out['metrics']:  # A custom loss may not sum accuracy.
      return jnp.zeros((), jnp.float32)
    return jnp.sum(jnp.where(reported, out['metrics'][name], 0.0))

  count = report_sum('count')
  num_included = as_f32(included)
  metrics = {
      'num_clients': jnp.asarray(weights.shape[0], jnp.float32),
      'num_dropped': as_f32(~arrived),
      'num_nonfinite_clients': as_f32(arrived & ~out['finite']),
      'num_empty_clients': as_f32(reported & ~(out['weight'] > 0)),
      'num_aggregated': num_included,
      'total_weight': jnp.sum(weights),
      'server_updated': updated.astype(jnp.float32),
      'train_loss': report_sum('loss_sum') / jnp.maximum(count, 1.0),
      'train_accuracy': report_sum('correct') / jnp.maximum(count, 1.0),
      'train_examples': count,
      'mean_local_steps': (jnp.sum(jnp.where(included,
                                             out['metrics']['num_steps'], 0))
                           / jnp.maximum(num_included, 1.0)),
      'update_norm': optax.tree.norm(aggregate),
  }
  for name, value in agg_metrics.items():
    metrics[f'aggregator/{name}'] = jnp.asarray(value, jnp.float32)
  for name, value in out['info'].items():
    metrics[f'transform/{name}'] = (
        jnp.sum(jnp.where(included, value, 0.0))
        / jnp.maximum(num_included, 1.0))
  return metrics
