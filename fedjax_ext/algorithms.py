"""Federated algorithms as `(init, apply)` factories over stacked cohorts.

Every algorithm here is one jitted round:

    algorithm = fedavg(loss_fn, optax.sgd(0.1), LocalConfig(batch_size=20,
                                                            num_steps=4))
    state = algorithm.init(params, model_state)
    state, metrics = algorithm.apply(state, cohort, client_ids, key)

The server treats the negated aggregate delta as a pseudo-gradient for an optax
optimiser, which is the FedOpt framework of Reddi et al. 2021, "Adaptive
Federated Optimization":

* FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep
  Networks from Decentralized Data"): SGD with server learning rate 1.
* FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous
  Networks"): FedAvg whose clients minimise loss + mu/2 ||w - w_server||^2.
* FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification"): server momentum.
* FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021): the paper's server
  rules as optax transformations (`server_optimizers.py`).
* SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
  Averaging for Federated Learning"), option II, with a control variate per
  client kept in the server state (see `scaffold`).
* Per-FedAvg (Fallah et al. 2020) and federated Reptile (Nichol et al. 2018;
  Jiang et al. 2019): FedOpt whose clients meta-learn on their own data
  with few_shot's task gradients (`meta_client.py`), so the server model is
  an initialisation for few-shot personalisation.

Server states are NamedTuples of arrays only, so `ondevice.checkpoint`
saves them. `round` counts rounds, including rounds where no client update
could be aggregated (then nothing else changes, see `rounds.py`); a training
loop derives round keys as `fold_in(seed_key, state.round)`, so a checkpoint
plus the config's seed resumes bit for bit.
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_ext import client as client_lib
from fedjax_ext import execution
from fedjax_ext import meta_client
from fedjax_ext import rounds as rounds_lib
from fedjax_ext import server_optimizers
from few_shot import learner as learner_lib
from ondevice import train

PyTree = Any


class ServerState(NamedTuple):
  """State of the FedOpt family.

  Attributes:
    params: the global model's full parameter tree.
    model_state: non-parameter collections (e.g. batch_stats), averaged
      over the aggregated clients.
    opt_state: server optimiser state over the trainable leaves (flat dict).
    round: int32 scalar, rounds applied so far.
    aggregator_state: state of `RoundConfig.stateful_aggregator` (e.g. the
      adaptive DP clip norm); () without one.
  """
  params: PyTree
  model_state: PyTree
  opt_state: optax.OptState
  round: jax.Array
  aggregator_state: PyTree = ()


class ScaffoldState(NamedTuple):
  """ServerState plus SCAFFOLD's control variates.

  Attributes:
    server_control: c, flat dict path -> array over the trainable leaves.
    client_controls: c_i of every pool client, flat dict path ->
      [num_clients, ...]; memory is num_clients x trainable params.
  """
  params: PyTree
  model_state: PyTree
  opt_state: optax.OptState
  round: jax.Array
  server_control: dict[str, jax.Array]
  client_controls: dict[str, jax.Array]
  aggregator_state: PyTree = ()


class FederatedAlgorithm(NamedTuple):
  """An algorithm as a pair of functions, as in FedJAX.

  Attributes:
    init: `init(params, model_state=None) -> state`.
    apply: jitted `apply(state, cohort, client_ids, key) -> (state,
      round_metrics)`; one call runs a whole round. With
      `ExecutionConfig.host_threads > 1` it is a Python function calling
      jitted parts instead (it cannot be traced; see execution.py).
  """
  init: Callable[..., Any]
  apply: Callable[..., Any]


def _server_step(server_optimizer, params, opt_state, result, paths):
  """Applies -aggregate as a pseudo-gradient; a no-op unless updated."""
  trainable, frozen = train.split_params(params, paths)
  pseudo_grad = {k: -result.aggregate[k] for k in paths}
  updates, new_opt_state = server_optimizer.update(pseudo_grad, opt_state,
                                                   trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  def keep(new, old):
    return jax.tree.map(lambda n, o: jnp.where(result.updated, n, o), new,
                        old)

  return (train.merge_params(keep(new_trainable, trainable), frozen),
          keep(new_opt_state, opt_state))


def fedopt(loss_fn: train.LossFn,
           client_optimizer: optax.GradientTransformation,
           local: client_lib.LocalConfig,
           server_optimizer: optax.GradientTransformation, *,
           rounds: rounds_lib.RoundConfig = rounds_lib.RoundConfig(),
           loss_wrapper: client_lib.LossWrapper | None = None,
           client_update: rounds_lib.ClientFn | None = None
           ) -> FederatedAlgorithm:
  """The general FedOpt algorithm (Reddi et al. 2021, Algorithm 1).

  Args:
    loss_fn: the clients' loss (see `ondevice.train.LossFn`).
    client_optimizer: local optimiser, fresh every round.
    local: local steps / epochs / batch size / trainable params.
    server_optimizer: optax transformation applied to -aggregate.
    rounds: aggregation and transform hooks, faults, execution strategy.
    loss_wrapper: client-side loss wrapper (FedProx's proximal term).
    client_update: a client update to run instead of local SGD on
      `loss_fn` (federated meta-learning, `meta_algorithms.py`).
  """
  if client_update is None:
    client_update = client_lib.make_client_update(loss_fn, client_optimizer,
                                                   local, loss_wrapper)

  def init(params: PyTree, model_state: PyTree = None) -> ServerState:
    paths = train.resolve_trainable(params, local.trainable)
    trainable, _ = train.split_params(params, paths)
    return ServerState(
        params=params, model_state=dict(model_state or {}),
        opt_state=server_optimizer.init(trainable),
        round=jnp.zeros((), jnp.int32),
        aggregator_state=rounds_lib.init_aggregator_state(rounds))

  def server_update(state: ServerState, result: rounds_lib.RoundResult):
    paths = train.resolve_trainable(state.params, local.trainable)
    params, opt_state = _server_step(server_optimizer, state.params,
                                     state.opt_state, result, paths)
    metrics = dict(result.metrics, round=state.round.astype(jnp.float32))
    return ServerState(params=params, model_state=result.model_state,
                       opt_state=opt_state, round=state.round + 1,
                       aggregator_state=result.aggregator_state), metrics

  def apply(state: ServerState, cohort, client_ids, key):
    result = rounds_lib.run_round(client_update, state.params,
                                  state.model_state, cohort, client_ids, key,
                                  rounds,
                                  aggregator_state=state.aggregator_state)
    return server_update(state, result)

  if rounds.execution.host_threads == 1:
    return FederatedAlgorithm(init=init, apply=jax.jit(apply))
  return FederatedAlgorithm(
      init=init, apply=_host_threaded_apply(client_update, rounds,
                                            server_update))


def _host_threaded_apply(client_update, rounds: rounds_lib.RoundConfig,
                         server_update):
  """`apply` that runs parts of the cohort from host threads (execution.py).

  Three kinds of jitted computation per round: `split_round`, one
  `client_part` per part (each from its own thread, at the same time), and
  `finish_round` with the server update.
  """
  threads = rounds.execution.host_threads
  pool = concurrent.futures.ThreadPoolExecutor(
      threads, thread_name_prefix='fedjax_ext_round')
  split = jax.jit(functools.partial(rounds_lib.split_round, config=rounds,
                                    parts=threads))
  part_fn = jax.jit(functools.partial(rounds_lib.client_part, client_update,
                                      config=rounds))

  @jax.jit
  def finish(state, parts, arrived, key):
    result = rounds_lib.finish_round(state.params, state.model_state, parts,
                                     arrived, key, rounds,
                                     state.aggregator_state)
    return server_update(state, result)

  def apply(state: ServerState, cohort, client_ids, key):
    execution.require_concrete((state, cohort, client_ids, key),
                               'FederatedAlgorithm.apply')
    execution.record_choice('host_threads', threads)
    arrived, pieces = split(cohort, client_ids, key)

    def run(piece):
      return part_fn(state.params, state.model_state, piece['cohort'],
                     piece['client_ids'], piece['arrived'], key,
                     context=piece['context'])

    parts = execution.host_map(run, pieces, pool)
    return finish(state, parts, arrived, key)

  return apply


def fedavg(loss_fn, client_optimizer, local, *, server_learning_rate=1.0,
           rounds=rounds_lib.RoundConfig()) -> FederatedAlgorithm:
  """FedAvg: params += server_learning_rate * aggregate."""
  return fedopt(loss_fn, client_optimizer, local,
                optax.sgd(server_learning_rate), rounds=rounds)


def fedprox(loss_fn, client_optimizer, local, *, mu: float,
            server_learning_rate=1.0, rounds=rounds_lib.RoundConfig()
            ) -> FederatedAlgorithm:
  """FedProx: FedAvg whose clients add mu/2 ||w - w_server||^2."""
  return fedopt(loss_fn, client_optimizer, local,
                optax.sgd(server_learning_rate), rounds=rounds,
                loss_wrapper=client_lib.proximal_wrapper(mu))


def fedavgm(loss_fn, client_optimizer, local, *, server_learning_rate=1.0,
            momentum=0.9, rounds=rounds_lib.RoundConfig()
            ) -> FederatedAlgorithm:
  """FedAvgM: v = momentum * v + aggregate; params += lr * v."""
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f'FedAvgM momentum must lie in [0, 1); got {momentum}.')
  return fedopt(loss_fn, client_optimizer, local,
                optax.sgd(server_learning_rate, momentum=momentum),
                rounds=rounds)


def fedadam(loss_fn, client_optimizer, local, *, server_learning_rate=1e-2,
            b1=0.9, b2=0.99, tau=1e-3, rounds=rounds_lib.RoundConfig()
            ) -> FederatedAlgorithm:
  """FedAdam (Reddi et al. 2021, Algorithm 2)."""
  return fedopt(loss_fn, client_optimizer, local,
                server_optimizers.adaptive_server_optimizer(
                    'adam', server_learning_rate, b1, b2, tau),
                rounds=rounds)


def fedyogi(loss_fn, client_optimizer, local, *, server_learning_rate=1e-2,
            b1=0.9, b2=0.99, tau=1e-3, rounds=rounds_lib.RoundConfig()
            ) -> FederatedAlgorithm:
  """FedYogi (Reddi et al. 2021, Algorithm 2)."""
  return fedopt(loss_fn, client_optimizer, local,
                server_optimizers.adaptive_server_optimizer(
                    'yogi', server_learning_rate, b1, b2, tau),
                rounds=rounds)


def fedadagrad(loss_fn, client_optimizer, local, *, server_learning_rate=1e-2,
               b1=0.9, tau=1e-3, rounds=rounds_lib.RoundConfig()
               ) -> FederatedAlgorithm:
  """FedAdagrad (Reddi et al. 2021, Algorithm 2)."""
  return fedopt(loss_fn, client_optimizer, local,
                server_optimizers.adaptive_server_optimizer(
                    'adagrad', server_learning_rate, b1, tau=tau),
                rounds=rounds)


def scaffold(loss_fn: train.LossFn, local_learning_rate: float,
             local: client_lib.LocalConfig, *, num_clients: int,
             server_learning_rate: float = 1.0,
             rounds: rounds_lib.RoundConfig = rounds_lib.RoundConfig()
             ) -> FederatedAlgorithm:
  """SCAFFOLD, option II (Karimireddy et al. 2020, Algorithm 1).

  Clients run plain SGD at `local_learning_rate` on the corrected gradient
  g(y) - c_i + c. A client that took K > 0 real steps updates
  c_i+ = c_i - c + (x - y_i) / (K * local_learning_rate), which for SGD is
  its average raw gradient. The server sets x += server_learning_rate *
  aggregate (the weighted mean delta; pass `uniform_weights=True` in
  `rounds` for the paper's plain mean) and c += (1 / num_clients) *
  sum over aggregated clients of (c_i+ - c_i). Clients that drop out or
  are excluded keep their c_i.

  Args:
    loss_fn: the clients' loss.
    local_learning_rate: eta_l of local SGD (needed by the c_i formula).
    local: local steps / epochs / batch size / trainable params.
    num_clients: N, size of the client pool; `client_ids` given to `apply`
      must lie in [0, N) (an id outside gets a NaN control variate, so the
      client is excluded and counted as non-finite).
    server_learning_rate: eta_g.
    rounds: hooks, faults, execution. Transforms apply to the model delta
      only, not to the control variate update.
  """
  _check_scaffold(local_learning_rate, num_clients, rounds)
  server_optimizer = optax.sgd(server_learning_rate)
  client_fn = _scaffold_client(loss_fn, local_learning_rate, local)

  def init(params: PyTree, model_state: PyTree = None) -> ScaffoldState:
    return _scaffold_init(params, model_state, local, num_clients,
                          server_optimizer, rounds)

  def apply(state: ScaffoldState, cohort, client_ids, key):
    paths = train.resolve_trainable(state.params, local.trainable)
    client_ids = jnp.asarray(client_ids, jnp.int32)
    correction = _scaffold_correction(state, client_ids, paths)
    result = rounds_lib.run_round(client_fn, state.params,
                                  state.model_state, cohort, client_ids, key,
                                  rounds, context=correction,
                                  aggregator_state=state.aggregator_state)
    params, opt_state = _server_step(server_optimizer, state.params,
                                     state.opt_state, result, paths)
    server_control, client_controls = _scaffold_controls(
        state, result, client_ids, num_clients)
    metrics = dict(result.metrics, round=state.round.astype(jnp.float32),
                   server_control_norm=optax.tree.norm(server_control))
    return ScaffoldState(
        params=params, model_state=result.model_state, opt_state=opt_state,
        round=state.round + 1, server_control=server_control,
        client_controls=client_controls,
        aggregator_state=result.aggregator_state), metrics

  return FederatedAlgorithm(init=init, apply=jax.jit(apply))


def _check_scaffold(local_learning_rate, num_clients,
                    rounds: rounds_lib.RoundConfig) -> None:
  if not local_learning_rate > 0:
    raise ValueError(f'local_learning_rate must be > 0; got '
                     f'{local_learning_rate}.')
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1; got {num_clients}.')
  if rounds.execution.host_threads != 1:
    raise ValueError(
        f'scaffold does not support host_threads='
        f'{rounds.execution.host_threads}: its control variates are updated '
        'in the same computation as the round; set host_threads=1.')


def _scaffold_client(loss_fn, local_learning_rate, local):
  """The client update; its extras are c_i+ - c_i + c (the mean gradient)."""
  client_update = client_lib.make_client_update(
      loss_fn, optax.sgd(local_learning_rate), local,
      client_lib.control_variate_wrapper())

  def scaffold_client(params, model_state, data, key, context):
    out = client_update(params, model_state, data, key, context)
    steps = jnp.maximum(out.metrics['num_steps'], 1.0)
    # c_i+ - c_i + c: the average raw gradient over the K local steps.
    mean_grad = {k: -d / (steps * local_learning_rate)
                 for k, d in out.delta.items()}
    return out._replace(extras=mean_grad)

  return scaffold_client


def _scaffold_correction(state: ScaffoldState, client_ids, paths):
  """c - c_i per cohort client (NaN for an id outside the pool)."""
  old_ci = {k: jnp.take(v, client_ids, axis=0, mode='fill',
                        fill_value=jnp.nan)
            for k, v in state.client_controls.items()}
  return {k: state.server_control[k][None] - old_ci[k] for k in paths}


def _scaffold_init(params, model_state, local, num_clients, server_optimizer,
                   rounds) -> ScaffoldState:
  """Zero control variates: one for the server, one per pool client."""
  paths = train.resolve_trainable(params, local.trainable)
  trainable, _ = train.split_params(params, paths)
  zeros = {k: jnp.zeros_like(v) for k, v in trainable.items()}
  return ScaffoldState(
      params=params, model_state=dict(model_state or {}),
      opt_state=server_optimizer.init(trainable),
      round=jnp.zeros((), jnp.int32), server_control=zeros,
      client_controls={k: jnp.zeros((num_clients,) + v.shape, v.dtype)
                       for k, v in trainable.items()},
      aggregator_state=rounds_lib.init_aggregator_state(rounds))


def _scaffold_controls(state: ScaffoldState, result, client_ids, num_clients):
  """(c, c_i) after the round; only aggregated clients move their c_i."""
  included = result.included

  def rows(x):
    return included.reshape((-1,) + (1,) * (x.ndim - 1))

  # Delta c_i = c_i+ - c_i = mean_grad_i - c, zero where not aggregated.
  delta_ci = {k: jnp.where(rows(g), g - state.server_control[k][None], 0.0)
              for k, g in result.extras.items()}
  client_controls = {
      k: v.at[client_ids].add(delta_ci[k], mode='drop')
      for k, v in state.client_controls.items()}
  server_control = {
      k: v + jnp.sum(delta_ci[k], axis=0) / num_clients
      for k, v in state.server_control.items()}
  return server_control, client_controls


def scaffold_algorithm(loss_fn: train.LossFn,
                       client_optimizer: optax.GradientTransformation,
                       local: client_lib.LocalConfig, *, num_clients: int,
                       local_learning_rate: float,
                       server_learning_rate: float = 1.0,
                       rounds: rounds_lib.RoundConfig = rounds_lib.RoundConfig()
                       ) -> FederatedAlgorithm:
  """`scaffold` in the factory shape that every entry of ALGORITHMS has.

  SCAFFOLD's control-variate formula assumes plain local SGD at
  `local_learning_rate`, so its clients run exactly that: `client_optimizer`
  is not used (a config with client momentum is rejected before this is
  called). `num_clients` and `local_learning_rate` come from the run (the
  pool size and the client learning rate), not from the algorithm's own
  sub-config.
  """
  del client_optimizer  # Plain SGD at local_learning_rate, see above.
  return scaffold(loss_fn, local_learning_rate, local,
                  num_clients=num_clients,
                  server_learning_rate=server_learning_rate, rounds=rounds)


def _stateless(algorithm: FederatedAlgorithm, name: str) -> FederatedAlgorithm:
  """Refuses batch statistics at `init`, before any round compiles."""

  def init(params, model_state=None):
    learner_lib.require_stateless(model_state, name)
    return algorithm.init(params, {})

  return algorithm._replace(init=init)


def per_fedavg(loss_fn, client_optimizer, local, *, server_learning_rate=1.0,
               alpha=0.01, variant='first_order',
               rounds=rounds_lib.RoundConfig()) -> FederatedAlgorithm:
  """Per-FedAvg (Fallah et al. 2020), see `meta_client`.

  The client optimiser's rate is the paper's beta, `alpha` the adaptation
  rate; `variant` is 'first_order' or 'hessian_free'.
  """
  client_update = meta_client.per_fedavg_client(
      loss_fn, client_optimizer, local, alpha=alpha, variant=variant)
  return _stateless(fedopt(loss_fn, client_optimizer, local,
                           optax.sgd(server_learning_rate), rounds=rounds,
                           client_update=client_update), 'per_fedavg')


def fed_reptile(loss_fn, client_optimizer, local, *, server_learning_rate=1.0,
                rounds=rounds_lib.RoundConfig()) -> FederatedAlgorithm:
  """Federated Reptile (clients as Reptile tasks), see `meta_client`.

  `server_learning_rate` is Reptile's epsilon.
  """
  client_update = meta_client.fed_reptile_client(loss_fn, client_optimizer,
                                                 local)
  return _stateless(fedopt(loss_fn, client_optimizer, local,
                           optax.sgd(server_learning_rate), rounds=rounds,
                           client_update=client_update), 'fed_reptile')


# Names a config can select. Every entry takes (loss_fn, client_optimizer,
# local, *, server_learning_rate, rounds, **hparams); the keyword arguments
# in RUN_ARGUMENTS are filled in by the run (not by the algorithm's
# sub-config) for the factories that take them.
RUN_ARGUMENTS = ('num_clients', 'local_learning_rate', 'server_learning_rate',
                 'rounds')
ALGORITHMS = {
    'fedavg': fedavg,
    'fedprox': fedprox,
    'fedavgm': fedavgm,
    'fedadam': fedadam,
    'fedyogi': fedyogi,
    'fedadagrad': fedadagrad,
    'scaffold': scaffold_algorithm,
    'per_fedavg': per_fedavg,
    'fed_reptile': fed_reptile,
}
