r"""Local-loop choice of the client update: lax.scan against unrolled steps.

One client's update (`fedjax_ext.client.make_client_update`, jitted, no vmap:
what 'streamed' execution runs per client) on 28 x 28 x 1 inputs, batch 8,
SGD, for three kinds of step:

  stock_conv   two `flax.linen.Conv` 3x3 layers (16, 32 channels) with 2x2
               max-pools, global average pool, classifier: XLA convolutions
  im2col_conv  the `ondevice.models` preset cnn_20k: the same layout whose
               convolutions are im2col matmuls
  dense_100k   784 -> 128 -> 10 MLP

each with `LocalConfig.loop` 'scan' and 'unroll', on the convolutions as
written (`conv='native'`) and rewritten into im2col matmuls (`conv='im2col'`,
`client.with_cpu_convolutions`, which also rewrites tiling max pools), at 4,
8 and 16 local steps. The four alternate within every repeat, so load
changes hit all; the median over repeats is reported with compile seconds.
With `--clients=N` each call runs N clients' updates in a `lax.scan` that
sums their deltas, as 'streamed' execution runs a round (the local loop is
then nested in the loop over clients). The rules of `client.resolve_loop`
and `client.resolve_conv` ('auto') are read off this table.

Every setting also reports XLA's FLOPs of the update (one local SGD step of
the model as written, `benchmarks.hardware.train_step_flops`, x local
steps: the same useful work for all three variants), achieved GFLOP/s and
its fraction of a 1024 x 1024 float32 matmul's GFLOP/s measured at the start
and end of the same run. A markdown table goes beside the JSON.

    python -m benchmarks.client_loop \
        --out=benchmarks/results/fedjax_comparison/client_loop.json
    python -m benchmarks.client_loop --clients=50 --steps=4 \
        --out=benchmarks/results/fedjax_comparison/client_loop_round.json
    python -m benchmarks.client_loop --models=dense_100k --steps=2 \
        --repeats=1 --out=/tmp/client_loop.json    # a smoke run
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import cli
from benchmarks import hardware
from fedjax_ext import client as client_lib
from fedjax_ext import execution
from ondevice import metric_writer
from ondevice import models
from ondevice import train

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'client_loop.json', 'JSON path.',
                           flag_values=FLAGS)
_STEPS = flags.DEFINE_list('steps', ['4', '8', '16'], 'Local step counts.',
                           flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed calls per setting.',
                                flag_values=FLAGS)
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Local batch size.',
                              flag_values=FLAGS)
_MODELS = flags.DEFINE_list('models', ['stock_conv', 'im2col_conv',
                                      'dense_100k'], 'Models, see above.',
                                      flag_values=FLAGS)
_CLIENTS = flags.DEFINE_integer(
    'clients', 1, "Clients per call, scanned as 'streamed' execution runs "
    'a round (1: the update alone).', flag_values=FLAGS)
VARIANTS = ('scan_native', 'unroll_native', 'scan_im2col', 'unroll_im2col')


class StockCNN(nn.Module):
  """A CNN of stock flax layers, as a user would write it (no `train`)."""
  channels: tuple[int, ...] = (16, 32)

  @nn.compact
  def __call__(self, x):
    for width in self.channels:
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class StockMLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def _models():
  return {'stock_conv': StockCNN(),
          'im2col_conv': models.build_model('cnn_20k', 10),
          'dense_100k': StockMLP()}


def _client(num_examples: int, clients: int = 1):
  """One client's data, or `clients` stacked on a leading axis."""
  rng = np.random.default_rng(0)
  lead = (clients,) if clients > 1 else ()
  return {'x': jnp.asarray(rng.normal(size=lead + (num_examples, 28, 28, 1)),
                           jnp.float32),
          'y': jnp.asarray(rng.integers(0, 10, lead + (num_examples,)),
                           jnp.int32),
          'mask': jnp.ones(lead + (num_examples,), jnp.float32)}


def _streamed(update, clients: int):
  """`clients` updates summed by `execution.stream_clients` (what
  'streamed' execution runs), or the update alone."""
  if clients == 1:
    return update

  def round_fn(params, model_state, data, key):
    def one(broadcast, client):
      out = update(*broadcast, client['data'], client['key'])
      return out.delta, ()
    per_client = {'data': data, 'key': jax.random.split(key, clients)}
    return execution.stream_clients(one, (params, model_state),
                                    per_client)[0]

  return round_fn


def _compiled(model, steps: int, variant: str, data):
  loop, conv = variant.split('_')
  x = data['x'] if _CLIENTS.value == 1 else data['x'][0]
  params = model.init(jax.random.key(0), x[:1])['params']
  update = client_lib.make_client_update(
      train.classification_loss(model), optax.sgd(0.05),
      client_lib.LocalConfig(batch_size=_BATCH.value, num_steps=steps,
                             loop=loop, conv=conv))
  update = _streamed(update, _CLIENTS.value)
  start = time.perf_counter()
  fn = jax.jit(update).lower(params, {}, data, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - start
  return (lambda: fn(params, {}, data, jax.random.key(1))), compile_s


def _update_flops(model, steps: int, data) -> float | None:
  """XLA FLOPs of one local SGD step of `model` x `steps`."""
  params = model.init(jax.random.key(0), data['x'][:1])['params']
  step = hardware.train_step_flops(
      train.classification_loss(model), params, {},
      (_BATCH.value,) + tuple(data['x'].shape[1:]), optax.sgd(0.05))
  return hardware.scaled(step, steps)


def _measure(name, model, steps: int, peak_gflops: float):
  data = _client(steps * _BATCH.value, _CLIENTS.value)
  runs = {variant: _compiled(model, steps, variant, data)
          for variant in VARIANTS}
  times = {loop: [] for loop in runs}
  for _ in range(_REPEATS.value + 1):  # The first repeat warms caches.
    for loop, (fn, _) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[loop].append(time.perf_counter() - start)
  flops = hardware.scaled(_update_flops(model, steps, _client(1)),
                          _CLIENTS.value)
  row = {'model': name, 'steps': steps, 'batch_size': _BATCH.value,
         'clients': _CLIENTS.value,
         'update_gflop': None if flops is None else flops / 1e9}
  for loop in runs:
    row[f'{loop}_sec'] = statistics.median(times[loop][1:])
    row[f'{loop}_compile_sec'] = runs[loop][1]
    row[f'{loop}_achieved'] = hardware.timed(flops, row[f'{loop}_sec'],
                                             peak_gflops)
  row['scan_over_unroll'] = row['scan_native_sec'] / row['unroll_native_sec']
  row['unroll_over_im2col'] = (row['unroll_native_sec'] /
                               row['scan_im2col_sec'])
  row['im2col_scan_over_unroll'] = (row['scan_im2col_sec'] /
                                    row['unroll_im2col_sec'])
  print(row, flush=True)
  return row


def _markdown(out) -> str:
  rows = []
  for r in out['rows']:
    row = {'model': r['model'], 'steps': r['steps'],
           'GFLOP': hardware.table_columns(r['scan_native_achieved'])['GFLOP']}
    for loop in VARIANTS:
      cells = hardware.table_columns(r[f'{loop}_achieved'])
      row[f'{loop} s'] = r[f'{loop}_sec']
      row[f'{loop} GFLOP/s'] = cells['GFLOP/s']
      row[f'{loop} % of peak'] = cells['% of peak']
    rows.append(row)
  peaks = hardware.peak_text(out['matmul_peak_start'], out['matmul_peak_end'])
  return (f"# One client's update: scan, unroll, im2col ({out['date']}, "
          f"{out['backend']}, {out['cpu_count']} CPUs)\n\n"
          f"{_CLIENTS.value} client(s) per call; batch "
          f"{_BATCH.value}; median of {_REPEATS.value} calls. GFLOP: XLA's "
          f'FLOPs of one step x steps. {peaks}\n\n'
          f'{metric_writer.markdown_table(rows)}\n')


def main(argv):
  del argv
  models_ = _models()
  unknown = sorted(set(_MODELS.value) - set(models_))
  if unknown:
    raise ValueError(f'--models has unknown {unknown}; choose from '
                     f'{sorted(models_)}.')
  load_start = [round(v, 2) for v in os.getloadavg()]
  peak_start = hardware.matmul_peak()
  rows = [_measure(name, models_[name], int(s), peak_start['gflops'])
          for name in _MODELS.value for s in _STEPS.value]
  out = {'date': datetime.datetime.now().isoformat(timespec='seconds'),
         'backend': jax.default_backend(), 'cpu_count': os.cpu_count(),
         'jax': jax.__version__, 'loadavg_start': load_start,
         'loadavg_end': [round(v, 2) for v in os.getloadavg()],
         'matmul_peak_start': peak_start,
         'matmul_peak_end': hardware.matmul_peak(),
         'rows': rows}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(_markdown(out))
  print(_markdown(out))


if __name__ == '__main__':
  cli.run(main, FLAGS)
