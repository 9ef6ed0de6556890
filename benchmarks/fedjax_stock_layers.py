"""Stock-layer models for the FedJAX comparison: what a user brings.

Each model exists twice with the same layout and initial values: a haiku
`fedjax.Model` of `hk.Conv2D` / `hk.Linear` for FedJAX, and a flax module of
`nn.Conv` / `nn.Dense` (no `train` argument, as users write them) for
fedjax_ext through `ondevice.train.classification_loss`. Neither side uses
the library's im2col convolutions. Rounds of the two sides alternate (one
FedJAX round, one of ours, ...) so that load changes on a shared machine hit
both; the ratio of medians is the reported speed-up.

  stock_cnn_5k   3x3 convs of 16 and 32 channels, each + ReLU + 2x2 max-pool,
                 global average pool, classifier               (5,258 params)
  stock_cnn_20k  the same with 32 and 64 channels              (19,466)
  dense_25k      784 -> 32 -> 10                                (25,450)
  dense_100k     784 -> 128 -> 10                               (101,770)
  dense_150k     784 -> 192 -> 10                               (152,650)
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks import hardware
from fedjax_ext import algorithms
from fedjax_ext import client as client_lib
from fedjax_ext import execution
from fedjax_ext import fedjax_interop
from fedjax_ext import rounds as rounds_lib
from ondevice import train

# name -> (conv channels, hidden sizes); conv stacks end in a global average.
STOCK_ARCHS = {
    'stock_cnn_5k': ((16, 32), ()),
    'stock_cnn_20k': ((32, 64), ()),
    'dense_25k': ((), (32,)),
    'dense_100k': ((), (128,)),
    'dense_150k': ((), (192,)),
}
# Per-round speed-up goals: stock convs 1.5x, dense models up to 100k 3x.
STOCK_GOALS = {'stock_cnn_5k': 1.5, 'stock_cnn_20k': 1.5, 'dense_25k': 3.0,
               'dense_100k': 3.0}
NUM_CLASSES = 10


class StockNet(nn.Module):
  """Stock flax layers in the layout of STOCK_ARCHS."""
  channels: tuple[int, ...]
  hidden: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.channels, start=1):
      x = nn.relu(nn.Conv(width, (3, 3), name=f'conv{i}')(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = jnp.mean(x, axis=(1, 2)) if self.channels else x.reshape(
        x.shape[0], -1)
    for i, width in enumerate(self.hidden, start=1):
      x = nn.relu(nn.Dense(width, name=f'hidden{i}')(x))
    return nn.Dense(NUM_CLASSES, name='classifier')(x)


def haiku_model(fedjax, name: str):
  """The fedjax.Model of `name`: hk.Conv2D / hk.Linear / hk.max_pool."""
  return haiku_cnn(fedjax, *STOCK_ARCHS[name])


def haiku_cnn(fedjax, channels, hidden, conv=None):
  """A fedjax.Model: 3x3 convs with 2x2 max-pooling, then dense layers.

  `conv(width, name=...)` builds each convolution; the default is haiku's
  stock `hk.Conv2D(width, 3)` (SAME padding, with bias).
  """
  import haiku as hk  # pylint: disable=g-import-not-at-top
  conv = conv or (lambda width, name: hk.Conv2D(width, 3, name=name))

  def forward(batch):
    x = batch['x']
    for i, width in enumerate(channels, start=1):
      x = jax.nn.relu(conv(width, name=f'conv{i}')(x))
      x = hk.max_pool(x, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
    x = jnp.mean(x, axis=(1, 2)) if channels else x.reshape(x.shape[0], -1)
    for i, width in enumerate(hidden, start=1):
      x = jax.nn.relu(hk.Linear(width, name=f'hidden{i}')(x))
    return hk.Linear(NUM_CLASSES, name='classifier')(x)

  def train_loss(batch, preds):
    return fedjax.metrics.unreduced_cross_entropy_loss(batch['y'], preds)

  return fedjax.create_model_from_haiku(
      hk.transform(forward), {'x': jnp.zeros((1, 28, 28, 1))}, train_loss)


def flax_params(haiku_params) -> dict[str, Any]:
  """Haiku {'conv1': {'w', 'b'}} -> flax {'conv1': {'kernel', 'bias'}}."""
  return {m: {'kernel': p['w'], 'bias': p['b']}
          for m, p in haiku_params.items()}


def haiku_params(params) -> dict[str, Any]:
  return {m: {'w': p['kernel'], 'b': p['bias']} for m, p in params.items()}


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def step_flops(loss_fn, params, settings) -> float | None:
  """XLA's FLOPs of one local SGD step at the local batch size."""
  optimizer = optax.sgd(settings['client_lr'])
  step = train.make_train_step(loss_fn, optimizer)
  state = train.state_from_params(params, {}, optimizer)
  b = settings['batch_size']
  batch = {'x': jnp.zeros((b, 28, 28, 1)), 'y': jnp.zeros((b,), jnp.int32),
           'mask': jnp.ones((b,))}
  return hardware.compiled_flops(step, state, batch, jax.random.key(0))


def _fedjax_rounds(fedjax, model, fd, init_params, settings):
  """A generator: each next() runs and times one FedJAX fed_avg round."""
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(settings['client_lr']),
      fedjax.optimizers.sgd(settings['server_lr']),
      fedjax.ShuffleRepeatBatchHParams(batch_size=settings['batch_size'],
                                       num_steps=settings['local_steps']))
  state = algorithm.init(init_params)
  client_ids = list(fd.client_ids())
  r = 0
  while True:
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), r),
                            len(client_ids))
    clients = [(cid, fd.get_client(cid), keys[i])
               for i, cid in enumerate(client_ids)]
    state, seconds = _timed(lambda: algorithm.apply(state, clients)[0])
    r += 1
    yield state.params, seconds


def _our_rounds(loss_fn, params, source, settings, host_threads=1):
  """A generator: each next() runs and times one fedjax_ext FedAvg round."""
  algorithm = algorithms.fedavg(
      loss_fn, optax.sgd(settings['client_lr']),
      client_lib.LocalConfig(batch_size=settings['batch_size'],
                             num_steps=settings['local_steps']),
      server_learning_rate=settings['server_lr'],
      rounds=rounds_lib.RoundConfig(
          execution=execution.ExecutionConfig(settings['execution'],
                                              host_threads=host_threads)))
  state = algorithm.init(params)
  ids = jnp.arange(source.num_clients)
  cohort = jax.device_put(source.cohort(
      ids, settings['examples_per_client'], jax.random.key(0)))
  r = 0
  while True:
    key = jax.random.fold_in(jax.random.key(1), r)
    state, seconds = _timed(
        lambda: algorithm.apply(state, cohort, ids, key)[0])
    r += 1
    yield state.params, seconds


def _summary(times: list[float]) -> dict[str, float]:
  return {'median': statistics.median(times), 'min': min(times),
          'max': max(times), 'count': len(times)}


def _timed_sides(sides, settings):
  """Runs the sides' rounds in turn; (last params, timed seconds) per side."""
  times = {name: [] for name in sides}
  last = {}
  for r in range(settings['rounds']):
    for name, rounds in sides.items():
      last[name], seconds = next(rounds)
      if r >= settings['warmup']:
        times[name].append(seconds)
  return last, times


def stock_row(fedjax, name: str, fd, all_data, settings: dict[str, Any],
              peak_gflops: float) -> dict[str, Any]:
  """One `stock_layers` row: interleaved rounds of FedJAX and of ours.

  Ours runs once per `settings['host_threads']` value (1: the round as one
  computation; T > 1: T parts of the cohort from T host threads, see
  `fedjax_ext.execution`). 'speedup' and 'loss_ours' are those of one
  computation; 'by_host_threads' has every setting's, and the goal is met
  when any setting meets it ('goal_met_with' names the first that does).
  """
  model = haiku_model(fedjax, name)
  init = model.init(jax.random.PRNGKey(0))
  flax_model = StockNet(*STOCK_ARCHS[name])
  loss_fn = train.classification_loss(flax_model)
  source = fedjax_interop.FederatedDataSource(fd)
  threads = sorted(set(settings.get('host_threads', (1,))) | {1})
  sides = {'fedjax': _fedjax_rounds(fedjax, model, fd, init, settings)}
  for t in threads:
    sides[_side(t)] = _our_rounds(loss_fn, flax_params(init), source,
                                  settings, host_threads=t)
  last, times = _timed_sides(sides, settings)
  choices = execution.resolved_choices()
  evaluate = jax.jit(lambda p: jnp.mean(
      model.train_loss(all_data, model.apply_for_eval(p, all_data))))
  flops = step_flops(loss_fn, flax_params(init), settings)
  round_flops = (None if flops is None else
                 flops * settings['num_clients'] * settings['local_steps'])
  speed = {k: _summary(v) for k, v in times.items()}
  by_threads = {}
  for t in threads:
    side = speed[_side(t)]['median']
    by_threads[str(t)] = {
        'sec_per_round': side,
        'sec_per_round_summary': speed[_side(t)],
        'speedup': speed['fedjax']['median'] / side,
        'loss_ours': float(evaluate(haiku_params(last[_side(t)]))),
        'achieved': hardware.achieved(round_flops, side, peak_gflops)}
  goal = STOCK_GOALS.get(name)
  met_with = [t for t in by_threads
              if goal is not None and by_threads[t]['speedup'] >= goal]
  return {
      'model': name,
      'params': sum(x.size for x in jax.tree.leaves(init)),
      'cohort': f"{settings['num_clients']}x"
                f"{settings['examples_per_client']}",
      'speedup': by_threads['1']['speedup'],
      'speedup_goal': goal,
      'goal_met': None if goal is None else bool(met_with),
      'goal_met_with': (f'host_threads={met_with[0]}' if met_with else None),
      'loss_initial': float(evaluate(init)),
      'loss_ours': by_threads['1']['loss_ours'],
      'loss_fedjax': float(evaluate(last['fedjax'])),
      'sec_per_round': {'fedjax': speed['fedjax'], 'ours': speed['ours']},
      'by_host_threads': by_threads,
      'ours_resolved': choices,
      'round_gflop': None if round_flops is None else round_flops / 1e9,
      'achieved': {'fedjax': hardware.achieved(
          round_flops, speed['fedjax']['median'], peak_gflops),
                   'ours': by_threads['1']['achieved']},
  }


def _side(host_threads: int) -> str:
  return 'ours' if host_threads == 1 else f'ours_threads{host_threads}'
