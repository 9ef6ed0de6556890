"""How FedUV's variants train: federated rounds or centralised minibatches.

Both run through the shared step loop (`ondevice.loop.run_loop`), in a work
directory of their own, so each variant checkpoints, resumes and writes its
`metrics.jsonl` like any other run. Federated variants take their rounds
from `fedjax_ext.federated_loop` (the algorithm of `config.algorithm`, built
by `fedjax_ext.training.build_algorithm`); the centralised baseline draws
epoch-shuffled minibatches (`ondevice.batching.EpochBatches`). Every key
derives from the `key` argument and the step number.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from fedjax_ext import cohort as cohort_lib
from fedjax_ext import experiment as fed_experiment
from fedjax_ext import federated_loop
from fedjax_ext import privacy
from fedjax_ext import training
from fedjax_ext.feduv import validation
from ondevice import batching
from ondevice import loop
from ondevice import optim
from ondevice import train
from ondevice.data.base import ArrayDataset

PyTree = Any


class Trained(NamedTuple):
  """A trained model and what its training reports."""
  params: PyTree
  model_state: PyTree
  info: dict[str, Any]


def _loss_info(records, loss_key: str) -> dict[str, Any]:
  """The final logged training loss and the curve of every logged one.

  Each logged value is the mean over its log window (one step or round
  when `log_every` is 1).
  """
  curve = [r[loss_key] for r in records if loss_key in r]
  return {'final_train_loss': curve[-1], 'train_loss_curve': curve}


def _bytes_float32(params: PyTree, trainable) -> int:
  """Bytes a client sends per round: its trainable leaves as float32."""
  flat = train.flatten_params(params)
  return sum(int(flat[p].size) * 4
             for p in train.resolve_trainable(params, trainable))


def train_federated(config, loss_fn: train.LossFn, train_ds: ArrayDataset,
                    params: PyTree, model_state: PyTree, key: jax.Array, *,
                    dp: bool, workdir: str, trainable=None) -> Trained:
  """`config.num_rounds` rounds of `config.algorithm` (DP-FedAvg if `dp`).

  Args:
    key: the round key; round r uses `fold_in(key, r)`.
    workdir: checkpoints and metrics.jsonl of this variant.
    trainable: which params clients train and send (None: all).
  """
  cfg = validation.with_dp(config, dp)
  pool = cohort_lib.ClientPool.from_dataset(train_ds)
  algorithm = training.build_algorithm(cfg, loss_fn, pool.num_clients,
                                       trainable)
  step = federated_loop.make_round_step(algorithm, train_ds, pool, cfg, key)
  # The federated run's logged columns: loss, accuracy, counters, bytes and
  # the DP clip norm, noise std and epsilon spent.
  epsilon = epsilon_of_rounds(cfg, pool.num_clients) if dp else None
  step = fed_experiment.logged_round_step(
      step, _bytes_float32(params, trainable), epsilon)
  schedule = loop.Schedule(num_steps=cfg.num_rounds, log_every=cfg.log_every,
                           checkpoint_every=cfg.checkpoint_every)
  result = loop.run_loop(algorithm.init(params, model_state), step, schedule,
                         workdir=workdir, config=cfg, unit='round',
                         counters=federated_loop.COUNTERS)
  info = {'rounds': cfg.num_rounds,
          **_loss_info(result.records, 'train_loss'),
          'nonfinite_clients_skipped': result.totals['num_nonfinite_clients'],
          'clients_dropped': result.totals['num_dropped']}
  if dp:
    info.update(dp_info(cfg, epsilon))
  return Trained(result.state.params, result.state.model_state, info)


def epsilon_of_rounds(config, num_clients: int) -> Callable[[int], float]:
  """rounds -> epsilon spent under `config.dp`.

  A cohort is `cohort_size` users drawn without replacement from
  `num_clients`, so epsilon is accounted for that sampling
  (`privacy.epsilon_curve`).
  """
  return privacy.epsilon_curve(config.dp.noise_multiplier, config.cohort_size,
                               num_clients, config.dp.delta)


def dp_info(config, epsilon: Callable[[int], float]) -> dict[str, Any]:
  """(epsilon, delta) after the run and the mechanism's settings."""
  dp = config.dp
  return {'dp_epsilon': epsilon(config.num_rounds), 'dp_delta': dp.delta,
          'dp_noise_multiplier': dp.noise_multiplier,
          'dp_clip_norm': dp.clip_norm, 'dp_sampling': 'without_replacement'}


def train_central(config, loss_fn: train.LossFn, train_ds: ArrayDataset,
                  params: PyTree, model_state: PyTree, key: jax.Array, *,
                  workdir: str, trainable=None) -> Trained:
  """`config.central.num_steps` minibatch steps on the pooled users' data."""
  central = config.central
  optimizer = optim.build_optimizer(central)
  state = train.state_from_params(params, model_state, optimizer, trainable)
  step = jax.jit(train.make_train_step(
      loss_fn, optimizer, train.resolve_trainable(params, trainable)))
  data_key, step_key = jax.random.split(key)
  batches = batching.EpochBatches(data_key, len(train_ds), central.batch_size)

  def step_fn(state, s: int):
    batch = batches.batch(s, train_ds.x, train_ds.y)
    return step(state, batch, jax.random.fold_in(step_key, s))

  schedule = loop.Schedule(num_steps=central.num_steps,
                           log_every=central.log_every,
                           checkpoint_every=central.checkpoint_every)
  result = loop.run_loop(state, step_fn, schedule, workdir=workdir,
                         config=config, unit='step')
  final_loss = _loss_info(result.records, 'loss')['final_train_loss']
  return Trained(result.state.params, result.state.model_state,
                 {'steps': central.num_steps, 'final_train_loss': final_loss})
