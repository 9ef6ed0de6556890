r"""Local-loop choice of the client update: lax.scan against unrolled steps.

One client's update (`fedjax_ext.client.make_client_update`, jitted, no vmap:
what 'streamed' execution runs per client) on 28 x 28 x 1 inputs, batch 8,
SGD, for three kinds of step:

  stock_conv   two `flax.linen.Conv` 3x3 layers (16, 32 channels) with 2x2
               max-pools, global average pool, classifier: XLA convolutions
  im2col_conv  the `ondevice.models` preset cnn_20k: the same layout whose
               convolutions are im2col matmuls
  dense_100k   784 -> 128 -> 10 MLP

each with `LocalConfig.loop` 'scan' and 'unroll' on the convolutions as
written (`conv='native'`), and 'scan' with them rewritten into im2col
matmuls (`conv='im2col'`, `client.with_cpu_convolutions`), at 4, 8 and 16
local steps. The three alternate within every repeat, so load changes hit
all; the median over repeats is reported with compile seconds. The rules of
`client.resolve_loop` and `client.resolve_conv` ('auto') are read off this
table.

    python -m benchmarks.client_loop \
        --out=benchmarks/results/fedjax_comparison/client_loop.json
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_ext import client as client_lib
from ondevice import models
from ondevice import train

_OUT = flags.DEFINE_string('out', 'client_loop.json', 'JSON path.')
_STEPS = flags.DEFINE_list('steps', ['4', '8', '16'], 'Local step counts.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed calls per setting.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Local batch size.')


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


def _client(num_examples: int):
  rng = np.random.default_rng(0)
  return {'x': jnp.asarray(rng.normal(size=(num_examples, 28, 28, 1)),
                           jnp.float32),
          'y': jnp.asarray(rng.integers(0, 10, num_examples), jnp.int32),
          'mask': jnp.ones((num_examples,), jnp.float32)}


def _compiled(model, steps: int, variant: str, data):
  loop, conv = variant.split('_')
  params = model.init(jax.random.key(0), data['x'][:1])['params']
  update = client_lib.make_client_update(
      train.classification_loss(model), optax.sgd(0.05),
      client_lib.LocalConfig(batch_size=_BATCH.value, num_steps=steps,
                             loop=loop, conv=conv))
  start = time.perf_counter()
  fn = jax.jit(update).lower(params, {}, data, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - start
  return (lambda: fn(params, {}, data, jax.random.key(1))), compile_s


def _measure(name, model, steps: int):
  data = _client(steps * _BATCH.value)
  runs = {variant: _compiled(model, steps, variant, data)
          for variant in ('scan_native', 'unroll_native', 'scan_im2col')}
  times = {loop: [] for loop in runs}
  for _ in range(_REPEATS.value + 1):  # The first repeat warms caches.
    for loop, (fn, _) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[loop].append(time.perf_counter() - start)
  row = {'model': name, 'steps': steps, 'batch_size': _BATCH.value}
  for loop in runs:
    row[f'{loop}_sec'] = statistics.median(times[loop][1:])
    row[f'{loop}_compile_sec'] = runs[loop][1]
  row['scan_over_unroll'] = row['scan_native_sec'] / row['unroll_native_sec']
  row['unroll_over_im2col'] = (row['unroll_native_sec'] /
                               row['scan_im2col_sec'])
  print(row, flush=True)
  return row


def main(argv):
  del argv
  load_start = [round(v, 2) for v in os.getloadavg()]
  rows = [_measure(name, model, int(s))
          for name, model in _models().items() for s in _STEPS.value]
  out = {'date': datetime.datetime.now().isoformat(timespec='seconds'),
         'backend': jax.default_backend(), 'cpu_count': os.cpu_count(),
         'jax': jax.__version__, 'loadavg_start': load_start,
         'loadavg_end': [round(v, 2) for v in os.getloadavg()],
         'rows': rows}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  app.run(main)
