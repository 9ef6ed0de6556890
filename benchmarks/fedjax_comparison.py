r"""FedJAX's `fed_avg` against fedjax_ext's FedAvg: same data, model, settings.

Both sides train the same pure haiku model (one `fedjax.Model`, so the
parameter trees, counts and initial values are identical) on the same
FedJAX `InMemoryFederatedData`: 2,000 Fashion-MNIST training images (a
fixed random subset) split into 100 clients x 20 examples. Every round runs
all 100 clients, 4 local SGD steps of batch 5 (one epoch), and a server SGD
step of learning rate 1 on the example-weighted mean delta (FedAvg).

* fedjax: `fedjax.algorithms.fed_avg.federated_averaging` with FedJAX's own
  client / server optimisers and `ShuffleRepeatBatchHParams(batch_size=5,
  num_steps=4)`, on its default `for_each_client` backend (one jitted call
  per client step, clients in a Python loop; the pmap backend only helps
  with several devices, and this machine has one).
* ours: `fedjax_ext.fedavg` on the model through
  `fedjax_interop.bridge_fedjax_model`: one jitted call runs the round
  (`vmap` over clients of a `lax.scan` over local steps). The cohort is
  read from the same FederatedData by `fedjax_interop.FederatedDataSource`.
  "ours" times the round with the cohort already on the device; "ours +
  gather" adds sampling the cohort and stacking it from the ArrayDataset
  (`cohort.gather_cohort`) and moving it to the device, every round.
* ours (flax, with --flax): the `ondevice.models` preset of that name (flax,
  `classification_loss`), started from the same initial values.

Models (28 x 28 x 1 inputs, 10 classes; presets of `ondevice.models`):
  mlp_2k    784 -> 3 -> 10                                      (2,395 params)
  cnn_2k    two 3x3 conv + 2x2 max-pool stages of 10 and 20 channels, global
            average pool, classifier                          (2,130 params)
  cnn_20k   the same with 32 and 64 channels                   (19,466)
  mlp_200k  784 -> 256 -> 10                                    (203,530)
Both sides compute the convolutions as im2col matmuls
(`ondevice.models.layers.cpu_friendly_conv_general_dilated`, the CPU path
of the flax models), so the comparison is of the federated execution, not
of two convolution kernels.

Seconds per round: every round is timed (after `block_until_ready`); the
first `--warmup` rounds of every run (compilation) are dropped and the
median over the remaining rounds of all seeds is reported, with min / max.
Seeds run fedjax and ours alternately so load changes hit both. Training
loss: mean cross-entropy of the server model over all 2,000 training
examples after `--rounds` rounds, with the same evaluation function for both
sides, per seed (FedJAX shuffles each client on the host with fresh OS
entropy when `seed=None`, so its runs differ; ours are keyed).

Goals (issue 3): ours >= 10x faster at the two small sizes, >= 1.5x at 200k;
equal loss within noise.

Stock layers (`--stock_models`, `benchmarks.fedjax_stock_layers`): models of
stock `nn.Conv` / `nn.Dense` for us and `hk.Conv2D` / `hk.Linear` for FedJAX
(no im2col on either side), on their own cohort (`--stock_cohort`, clients x
examples, all clients every round), rounds of the two sides alternating.
Results go to the `stock_layers` list of results.json (goals: stock convs
>= 1.5x, dense models up to 100k params >= 3x, equal losses). Ours runs once
per `--stock_host_threads` value: 1 is the round as one computation, T > 1
splits the cohort into T parts run from T host threads at once
(`ExecutionConfig.host_threads`); each row keeps every setting's time, speed-up
and loss under `by_host_threads`.

Every row reports achieved GFLOP/s per side: XLA's cost analysis of one
local SGD step (`benchmarks.hardware.compiled_flops`) x local steps x
clients per round, over the median round time, next to the matmul peak
measured in the same run (a jitted 1024 x 1024 float32 matmul, best of 20,
at the start and at the end). The machine's load average at the start and
end is recorded: on a shared machine only the ratios are robust.

    pip install -e '.[fedjax]'
    python -m benchmarks.fedjax_comparison \
        --out=benchmarks/results/fedjax_comparison/results.json

writes results.json and results.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Any

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import cli
from benchmarks import fedjax_stock_layers as stock
from benchmarks import hardware
from fedjax_ext import algorithms
from fedjax_ext import client as client_lib
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import execution
from fedjax_ext import fedjax_interop
from fedjax_ext import rounds as rounds_lib
from ondevice import metric_writer
from ondevice import models
from ondevice import train
from ondevice.data import images
from ondevice.models import layers

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'results.json', 'JSON path; the markdown '
                           'table goes next to it with a .md suffix.',
                           flag_values=FLAGS)
_MODELS = flags.DEFINE_list('models', ['mlp_2k', 'cnn_2k', 'cnn_20k',
                                      'mlp_200k'],
                            'Models, see the module docstring.',
                            flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer('rounds', 8, 'Rounds per run.',
                               flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed first rounds per run.',
                               flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer('seeds', 2, 'Runs per side and model.',
                              flag_values=FLAGS)
_CLIENTS = flags.DEFINE_integer('num_clients', 100, 'Clients (all per round).',
                                flag_values=FLAGS)
_EXAMPLES, _BATCH, _STEPS = cli.define_client_workload(FLAGS)
_CLIENT_LR = flags.DEFINE_float('client_lr', 0.1, 'Client SGD learning rate.',
                                flag_values=FLAGS)
_SERVER_LR = flags.DEFINE_float('server_lr', 1.0, 'Server SGD learning rate.',
                                flag_values=FLAGS)
_EXECUTION = flags.DEFINE_enum('execution', 'auto', execution.STRATEGIES,
                               'Our execution strategy.', flag_values=FLAGS)
_CHUNK = flags.DEFINE_integer('chunk_size', None, "Clients per chunk of "
                              "--execution=chunked (None: automatic).",
                              flag_values=FLAGS)
_FLAX = flags.DEFINE_bool('flax', False, 'Also time the flax model.',
                          flag_values=FLAGS)
_STOCK_MODELS = flags.DEFINE_list(
    'stock_models', list(stock.STOCK_ARCHS), 'Stock-layer models (see '
    'benchmarks/fedjax_stock_layers.py); empty to skip them.',
    flag_values=FLAGS)
_STOCK_COHORT = flags.DEFINE_string('stock_cohort', '50x32', 'Clients x '
                                    'examples of the stock-layer rows.',
                                    flag_values=FLAGS)
_STOCK_BATCH = flags.DEFINE_integer('stock_batch_size', 8, 'Local batch size '
                                    'of the stock-layer rows.',
                                    flag_values=FLAGS)
_STOCK_STEPS = flags.DEFINE_integer('stock_local_steps', 4, 'Local steps of '
                                    'the stock-layer rows.', flag_values=FLAGS)
_STOCK_THREADS = flags.DEFINE_list(
    'stock_host_threads', ['1', '2'], 'ExecutionConfig.host_threads values '
    'ours runs with on the stock-layer models (1 is always run: one '
    'computation per round).', flag_values=FLAGS)
_STOCK_ROUNDS = flags.DEFINE_integer('stock_rounds', 6, 'Rounds per side of '
                                     'each stock-layer row (alternating).',
                                     flag_values=FLAGS)

# name -> (conv channels, hidden sizes); conv stacks end in a global average.
_ARCHS = {
    'mlp_2k': ((), (3,)),
    'cnn_2k': ((10, 20), ()),
    'cnn_20k': ((32, 64), ()),
    'mlp_200k': ((), (256,)),
}
_NUM_CLASSES = 10
_GOALS = {'mlp_2k': 10.0, 'cnn_2k': 10.0, 'cnn_20k': 10.0, 'mlp_200k': 1.5}


def _haiku_model(fedjax, name: str):
  """The fedjax.Model of `name`, laid out as the ondevice.models preset."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  channels, hidden = _ARCHS[name]

  class Conv3x3(hk.Module):
    """SAME 3x3 conv with bias, as im2col (flax's nn.Conv in SmallCNN)."""

    def __init__(self, features, name=None):
      super().__init__(name=name)
      self.features = features

    def __call__(self, x):
      w = hk.get_parameter(
          'w', (3, 3, x.shape[-1], self.features), x.dtype,
          init=hk.initializers.VarianceScaling(1.0, 'fan_in',
                                               'truncated_normal'))
      b = hk.get_parameter('b', (self.features,), x.dtype, init=jnp.zeros)
      y = layers.cpu_friendly_conv_general_dilated(
          x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return y + b

  return stock.haiku_cnn(fedjax, channels, hidden, conv=Conv3x3)


def _flax_params(haiku_params, flax_model) -> Any:
  """Haiku {'conv1': {'w', 'b'}} -> flax {'conv1': {'kernel', 'bias'}}."""
  converted = {m: {'kernel': p['w'], 'bias': p['b']}
               for m, p in haiku_params.items()}
  reference = flax_model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  shapes = jax.tree.map(jnp.shape, reference['params'])
  if jax.tree.map(jnp.shape, converted) != shapes:
    raise ValueError(f'Haiku and flax layouts differ: {shapes}')
  return converted


def _federated_data(fedjax, seed: int = 0, num_clients: int | None = None,
                    per: int | None = None):
  """Clients x examples Fashion-MNIST images as an InMemoryFederatedData."""
  ds = images.load_fashion_mnist('train')
  num_clients = num_clients or _CLIENTS.value
  per = per or _EXAMPLES.value
  index = np.random.default_rng(seed).permutation(len(ds))[:num_clients * per]
  x, y = ds.x[index], ds.y[index]
  clients = {f'{i:04d}'.encode(): {'x': x[i * per:(i + 1) * per],
                                   'y': y[i * per:(i + 1) * per]}
             for i in range(num_clients)}
  return fedjax.InMemoryFederatedData(clients), {'x': x, 'y': y}


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def _run_fedjax(fedjax, model, fd, init_params, seed: int):
  """FedJAX fed_avg; returns (final fedjax params, per-round seconds)."""
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(_CLIENT_LR.value),
      fedjax.optimizers.sgd(_SERVER_LR.value),
      fedjax.ShuffleRepeatBatchHParams(batch_size=_BATCH.value,
                                       num_steps=_STEPS.value))
  state = algorithm.init(init_params)
  client_ids = list(fd.client_ids())
  times = []
  for r in range(_ROUNDS.value):
    round_key = jax.random.fold_in(jax.random.PRNGKey(seed), r)
    keys = jax.random.split(round_key, len(client_ids))

    def one_round():
      clients = [(cid, fd.get_client(cid), keys[i])
                 for i, cid in enumerate(client_ids)]
      return algorithm.apply(state, clients)[0]

    state, seconds = _timed(one_round)
    times.append(seconds)
  return state.params, times


def _run_ours(loss_fn, params, ds, pool, seed: int):
  """fedjax_ext FedAvg; returns (params, round seconds, gather seconds)."""
  algorithm = algorithms.fedavg(
      loss_fn, optax.sgd(_CLIENT_LR.value),
      client_lib.LocalConfig(batch_size=_BATCH.value, num_steps=_STEPS.value),
      server_learning_rate=_SERVER_LR.value,
      rounds=rounds_lib.RoundConfig(
          execution=execution.ExecutionConfig(_EXECUTION.value,
                                              _CHUNK.value)))
  state = algorithm.init(params)
  seed_key = jax.random.key(seed)
  round_times, gather_times = [], []
  for r in range(_ROUNDS.value):
    sample_key, data_key, round_key = jax.random.split(
        jax.random.fold_in(seed_key, r), 3)

    def gather():
      ids = cohort_lib.sample_clients(sample_key, pool.sizes,
                                      _CLIENTS.value)
      cohort = cohort_lib.gather_cohort(ds, ids, _EXAMPLES.value, data_key,
                                        pool)
      return jax.device_put(cohort), ids

    (cohort, ids), seconds = _timed(gather)
    gather_times.append(seconds)
    state, seconds = _timed(
        lambda: algorithm.apply(state, cohort, ids, round_key)[0])
    round_times.append(seconds)
  return state.params, round_times, gather_times


def _summary(times: list[float]) -> dict[str, float]:
  return {'median': statistics.median(times), 'min': min(times),
          'max': max(times), 'count': len(times)}


def _loss_summary(values: list[float]) -> dict[str, Any]:
  return {'per_seed': values, 'mean': float(np.mean(values)),
          'std': float(np.std(values))}


def _existing_settings() -> dict[str, Any]:
  return {'client_lr': _CLIENT_LR.value, 'batch_size': _BATCH.value}


def _gflops(loss_fn, params, speed, peak) -> dict[str, Any]:
  """Round GFLOP (XLA, one step x steps x clients) and GFLOP/s per side."""
  flops = stock.step_flops(loss_fn, params, _existing_settings())
  if flops is None:
    return {'round_gflop': None, 'achieved': {}}
  round_flops = flops * _CLIENTS.value * _STEPS.value
  return {'round_gflop': round_flops / 1e9,
          'achieved': {k: hardware.achieved(round_flops, v['median'], peak)
                       for k, v in speed.items()}}


def _benchmark(fedjax, name: str, fd, all_data, peak) -> dict[str, Any]:
  model = _haiku_model(fedjax, name)
  init_params = model.init(jax.random.PRNGKey(0))
  bridge = fedjax_interop.bridge_fedjax_model(model, init_params)
  source = fedjax_interop.FederatedDataSource(fd)
  ds = source.to_array_dataset(num_classes=_NUM_CLASSES)
  pool = cohort_lib.ClientPool.from_dataset(ds)
  flax_model = models.build_model(name, _NUM_CLASSES)
  flax_init = _flax_params(init_params, flax_model)

  @jax.jit
  def train_loss(fedjax_params):
    preds = model.apply_for_eval(fedjax_params, all_data)
    return jnp.mean(model.train_loss(all_data, preds))

  def flax_to_fedjax(params):
    return {m: {'w': p['kernel'], 'b': p['bias']} for m, p in params.items()}

  warm = _WARMUP.value
  times = {'fedjax': [], 'ours': [], 'ours_with_gather': [],
           'ours_flax': []}
  first = {k: [] for k in times}
  losses = {k: [] for k in ('fedjax', 'ours', 'ours_flax')}
  for seed in range(_SEEDS.value):
    params, t = _run_fedjax(fedjax, model, fd, init_params, seed)
    times['fedjax'] += t[warm:]
    first['fedjax'].append(t[0])
    losses['fedjax'].append(float(train_loss(params)))
    params, t, g = _run_ours(bridge.loss_fn, bridge.params, ds, pool, seed)
    times['ours'] += t[warm:]
    times['ours_with_gather'] += [a + b for a, b in zip(t[warm:], g[warm:])]
    first['ours'].append(t[0])
    losses['ours'].append(float(train_loss(bridge.to_fedjax(params))))
    if _FLAX.value:
      params, t, _ = _run_ours(train.classification_loss(flax_model),
                               flax_init, ds, pool, seed)
      times['ours_flax'] += t[warm:]
      first['ours_flax'].append(t[0])
      losses['ours_flax'].append(float(train_loss(flax_to_fedjax(params))))
    logging.info('%s seed %d: fedjax %.4f s, ours %.4f s (medians so far)',
                 name, seed, statistics.median(times['fedjax']),
                 statistics.median(times['ours']))
  times = {k: v for k, v in times.items() if v}
  return _row(name, times, first, losses, init_params, bridge, flax_init,
              float(train_loss(init_params)), peak)


def _row(name, times, first, losses, init_params, bridge, flax_init,
         initial_loss, peak) -> dict[str, Any]:
  """One row of `models` from the timings and losses of `_benchmark`."""
  speed = {k: _summary(v) for k, v in times.items()}
  ratio = speed['fedjax']['median'] / speed['ours']['median']
  count = sum(x.size for x in jax.tree.leaves(init_params))
  return {
      'model': name,
      'params_fedjax': count,
      'params_ours': sum(x.size for x in jax.tree.leaves(bridge.params)),
      'params_ondevice_preset': models.count_params(flax_init),
      'sec_per_round': speed,
      'first_round_sec': {k: v for k, v in first.items() if v},
      'speedup_fedjax_over_ours': ratio,
      'speedup_fedjax_over_ours_with_gather': (
          speed['fedjax']['median'] / speed['ours_with_gather']['median']),
      'speedup_goal': _GOALS.get(name),
      'goal_met': bool(ratio >= _GOALS.get(name, 0.0)),
      'initial_train_loss': initial_loss,
      'final_train_loss': {k: _loss_summary(v) for k, v in losses.items()
                           if v},
      **_gflops(bridge.loss_fn, bridge.params, speed, peak),
  }


def _markdown(results: dict[str, Any]) -> str:
  rows = []
  for r in results['models']:
    s, loss = r['sec_per_round'], r['final_train_loss']

    def fmt_loss(k):
      if k not in loss:
        return '-'
      return f"{loss[k]['mean']:.4f} ± {loss[k]['std']:.4f}"

    rows.append({
        'model': r['model'],
        'params (both)': r['params_fedjax'],
        'fedjax s/round': s['fedjax']['median'],
        'ours s/round': s['ours']['median'],
        'speed-up': round(r['speedup_fedjax_over_ours'], 1),
        'goal': f"≥{r['speedup_goal']}x",
        'met': 'yes' if r['goal_met'] else 'NO',
        'ours+gather s/round': s['ours_with_gather']['median'],
        'speed-up w/ gather': round(
            r['speedup_fedjax_over_ours_with_gather'], 1),
        'ours flax s/round': (s['ours_flax']['median']
                              if 'ours_flax' in s else '-'),
        'loss at start': round(r['initial_train_loss'], 4),
        f"fedjax loss @{results['config']['rounds']}": fmt_loss('fedjax'),
        f"ours loss @{results['config']['rounds']}": fmt_loss('ours'),
        'ours flax loss': fmt_loss('ours_flax'),
        **_gflops_columns(r),
    })
  c, env = results['config'], results['environment']
  head = (f"# FedJAX fed_avg vs fedjax_ext FedAvg ({env['date']}, "
          f"{env['device']}, jax {env['jax']}, fedjax {env['fedjax']})\n\n"
          f"{c['num_clients']} clients x {c['examples_per_client']} "
          f"Fashion-MNIST examples, all clients every round, "
          f"{c['local_steps']} local SGD steps of batch {c['batch_size']} "
          f"(lr {c['client_lr']}), server SGD lr {c['server_lr']}; ours with "
          f"execution={c['execution']!r}"
          + (f" (chunk_size={c['chunk_size']})" if c.get('chunk_size')
             else '') + ". Seconds "
          f"per round: median over rounds {c['warmup'] + 1}..{c['rounds']} "
          f"of {c['seeds']} runs per side (compilation excluded). Loss: "
          f"mean training cross-entropy of the server model over all "
          f"{c['num_clients'] * c['examples_per_client']} examples after "
          f"{c['rounds']} rounds, mean ± std over runs. Machine load "
          f"average {env['loadavg_start']} at the start, "
          f"{env['loadavg_end']} at the end ({env['cpu_count']} CPUs); "
          "timings share 2 cores with other jobs, so only the ratios of "
          "interleaved runs are robust. Matmul peak "
          f"{_peak_text(env)}.\n\n")
  text = head + (metric_writer.markdown_table(rows) + '\n' if rows else '')
  return text + _stock_markdown(results)


def _peak_text(env) -> str:
  peaks = [env.get(k) for k in ('matmul_peak_start', 'matmul_peak_end')]
  text = ' / '.join(f"{p['gflops']:.1f}" for p in peaks if p)
  return f'{text} GFLOP/s (1024 x 1024 float32; start / end of the run)'


def _gflops_columns(row) -> dict[str, Any]:
  """GFLOP/s of both sides and ours as a fraction of the matmul peak."""
  achieved = row.get('achieved', {})
  out = {}
  for side in ('fedjax', 'ours'):
    value = achieved.get(side, {}).get('gflops')
    out[f'{side} GFLOP/s'] = '-' if value is None else round(value, 2)
  fraction = achieved.get('ours', {}).get('fraction_of_peak')
  out['ours % of peak'] = '-' if fraction is None else round(100 * fraction,
                                                             1)
  return out


def _threaded_columns(row) -> dict[str, Any]:
  """Ours with host_threads > 1: s/round, speed-up and loss per setting."""
  out = {}
  for t, side in sorted(row.get('by_host_threads', {}).items()):
    if t == '1':
      continue
    out[f'ours {t} threads s/round'] = side['sec_per_round']
    out[f'speed-up {t} threads'] = round(side['speedup'], 2)
    out[f'ours {t} threads loss'] = round(side['loss_ours'], 4)
  return out


def _stock_markdown(results) -> str:
  rows = []
  for r in results['stock_layers']:
    s = r['sec_per_round']
    met = {None: '-', True: 'yes', False: 'NO'}[r['goal_met']]
    if r.get('goal_met_with') not in (None, 'host_threads=1'):
      met += f" ({r['goal_met_with']})"
    rows.append({
        'model': r['model'], 'params (both)': r['params'],
        'cohort': r['cohort'],
        'fedjax s/round': s['fedjax']['median'],
        'ours s/round': s['ours']['median'],
        'speed-up': round(r['speedup'], 2),
        **_threaded_columns(r),
        'goal': '-' if r['speedup_goal'] is None else
                f"≥{r['speedup_goal']}x",
        'met': met,
        'loss at start': round(r['loss_initial'], 4),
        'fedjax loss': round(r['loss_fedjax'], 4),
        'ours loss': round(r['loss_ours'], 4),
        'ours ran as': (f"{r['ours_resolved'].get('execution')}, "
                        f"{r['ours_resolved'].get('local_loop')}"),
        **_gflops_columns(r),
    })
  if not rows:
    return ''
  c = results['config']
  cores = results['environment']['cpu_count']
  return ('\n## Stock layers (flax nn.Conv / nn.Dense vs haiku hk.Conv2D / '
          f"hk.Linear)\n\n{c['stock_local_steps']} local SGD steps of batch "
          f"{c['stock_batch_size']}, all clients every round; rounds of the "
          'sides alternate; median over rounds '
          f"{c['warmup'] + 1}..{c['stock_rounds']}. Loss: training "
          'cross-entropy of the server model over all the cohort\'s examples '
          f"after {c['stock_rounds']} rounds (one run per side). 'ours' runs "
          "each round as one computation; 'ours T threads' runs T parts of "
          'the cohort from T host threads at once (ExecutionConfig.'
          f"host_threads, on this machine's {cores} cores); FedJAX's "
          'fed_avg runs its clients one after the other.\n\n'
          + metric_writer.markdown_table(rows) + '\n')


def _stock_settings() -> dict[str, Any]:
  clients, examples = (int(v) for v in _STOCK_COHORT.value.split('x'))
  return {'num_clients': clients, 'examples_per_client': examples,
          'batch_size': _STOCK_BATCH.value,
          'local_steps': _STOCK_STEPS.value, 'rounds': _STOCK_ROUNDS.value,
          'warmup': _WARMUP.value, 'client_lr': _CLIENT_LR.value,
          'server_lr': _SERVER_LR.value, 'execution': _EXECUTION.value,
          'host_threads': [int(t) for t in _STOCK_THREADS.value]}


def _check_flags() -> None:
  for name in _MODELS.value:
    if name not in _ARCHS:
      raise ValueError(f'Unknown --models entry {name!r}; choose from '
                       f'{list(_ARCHS)}.')
  for name in _STOCK_MODELS.value:
    if name not in stock.STOCK_ARCHS:
      raise ValueError(f'Unknown --stock_models entry {name!r}; choose from '
                       f'{list(stock.STOCK_ARCHS)}.')
  parts = _STOCK_COHORT.value.split('x')
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f'--stock_cohort must be CLIENTSxEXAMPLES, e.g. 50x32; '
                     f'got {_STOCK_COHORT.value!r}.')
  if not all(t.isdigit() and int(t) >= 1 for t in _STOCK_THREADS.value):
    raise ValueError(f'--stock_host_threads must list integers >= 1; got '
                     f'{_STOCK_THREADS.value}.')
  if _STOCK_ROUNDS.value <= _WARMUP.value:
    raise ValueError(f'--stock_rounds={_STOCK_ROUNDS.value} leaves no timed '
                     f'round after --warmup={_WARMUP.value}.')


def main(argv):
  del argv
  _check_flags()
  fedjax = fedjax_interop.import_fedjax()
  out = {'models': [], 'stock_layers': [],
         'loadavg_start': [round(v, 2) for v in os.getloadavg()],
         'matmul_peak_start': hardware.matmul_peak()}
  peak = out['matmul_peak_start']['gflops']
  if _MODELS.value:
    fd, all_data = _federated_data(fedjax)
    all_data = jax.device_put(all_data)
    for name in _MODELS.value:
      out['models'].append(_benchmark(fedjax, name, fd, all_data, peak))
      _write(out)  # After every model: partial results.
  settings = _stock_settings()
  if _STOCK_MODELS.value:
    fd, all_data = _federated_data(fedjax, 1, settings['num_clients'],
                                   settings['examples_per_client'])
    all_data = jax.device_put(all_data)
    for name in _STOCK_MODELS.value:
      out['stock_layers'].append(
          stock.stock_row(fedjax, name, fd, all_data, settings, peak))
      _write(out)
  out['matmul_peak_end'] = hardware.matmul_peak()
  _write(out)


def _write(partial: dict[str, Any]) -> None:
  out = {
      'config': {k: FLAGS[k].value for k in (
          'models', 'rounds', 'warmup', 'seeds', 'num_clients',
          'examples_per_client', 'batch_size', 'local_steps', 'client_lr',
          'server_lr', 'execution', 'chunk_size', 'stock_models',
          'stock_cohort', 'stock_batch_size', 'stock_local_steps',
          'stock_rounds', 'stock_host_threads')},
      'environment': {
          'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'device': jax.devices()[0].platform,
          'device_kind': jax.devices()[0].device_kind,
          'cpu_count': os.cpu_count(), 'platform': platform.platform(),
          'jax': jax.__version__, 'fedjax': _fedjax_version(),
          'loadavg_start': partial['loadavg_start'],
          'loadavg_end': [round(v, 2) for v in os.getloadavg()],
          'matmul_peak_start': partial['matmul_peak_start'],
          'matmul_peak_end': partial.get('matmul_peak_end')},
      'models': partial['models'],
      'stock_layers': partial['stock_layers'],
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(_markdown(out))
  print(_markdown(out), flush=True)


def _fedjax_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version('fedjax')


if __name__ == '__main__':
  cli.run(main, FLAGS)
