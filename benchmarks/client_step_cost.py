r"""Where the main job's client step spends its time, against the matmul peak.

One local step of `configs/fed_kws.py` (DS-CNN S with batch norm and a
(4, 4) first stride, momentum SGD, batch 8 of [98, 40] log-mels) as the
client update runs it (`ondevice.train.make_train_step`, jitted):

* achieved GFLOP/s: XLA's cost analysis of the step over its median time,
  as a fraction of a 1024 x 1024 float32 matmul's GFLOP/s measured in the
  same run (`benchmarks.hardware`);
* the largest costs: a `jax.profiler` trace of `--profile_steps` steps,
  its XLA:CPU op events summed by name, each op named with the layer it
  comes from (the `op_name` metadata of the compiled HLO), and summed by
  module and pass (`by_module`) and by JAX op and pass (`by_op_kind`; e.g.
  `select_n (backward)` is the ReLU gradients' masks).

    python -m benchmarks.client_step_cost \
        --out=benchmarks/results/fed_scaling/client_step_cost.json
"""
from __future__ import annotations

import collections
import datetime
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import optax

from benchmarks import cli
from benchmarks import hardware
from configs import fed_kws
from ondevice import models
from ondevice import train
from ondevice.data import speech_keywords

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'client_step_cost.json', 'JSON path.',
                           flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 30, 'Timed steps.',
                                flag_values=FLAGS)
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 10, 'Profiled steps.',
                                      flag_values=FLAGS)
_TOP = flags.DEFINE_integer('top', 8, 'Ops listed.', flag_values=FLAGS)


def _step_and_inputs():
  """The jitted client step of fed_kws and one batch of its shape."""
  config = fed_kws.get_config()
  model = models.build_model(
      config.model, len(speech_keywords.WORDS), norm=config.norm,
      **{k: tuple(v) if isinstance(v, list) else v
         for k, v in config.model_kwargs.items()})
  b = config.local.batch_size
  x = jax.random.normal(jax.random.key(0), (b, 98, 40))
  optimizer = optax.sgd(config.client_learning_rate,
                        momentum=config.client_momentum)
  state = train.init_state(model, optimizer, x[:1], jax.random.key(1))
  batch = {'x': x, 'y': jnp.arange(b, dtype=jnp.int32) % 10,
           'mask': jnp.ones((b,))}
  step = train.make_train_step(train.classification_loss(model), optimizer)
  return step, (state, batch, jax.random.key(2)), config


def _median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _op_layers(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name metadata (the layer) it came from."""
  out = {}
  for line in hlo_text.splitlines():
    name = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    op = re.search(r'op_name="([^"]+)"', line)
    if name and op:
      out[name.group(1)] = op.group(1)
  return out


def _profile(fn, args, steps: int) -> collections.Counter:
  """Microseconds per XLA op event name over `steps` calls."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'),
                     recursive=True)[-1]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      totals[e['name']] += float(e['dur'])
  return totals


def _grouped(ops: dict[str, float], layers: dict[str, str],
             steps: int) -> dict[str, list[dict[str, Any]]]:
  """Op time per step summed by layer (module, pass) and by op kind."""
  by_module, by_kind = collections.Counter(), collections.Counter()
  for name, micros in ops.items():
    path = layers.get(name, layers.get(name.split(':')[0], ''))
    parts = path.split('/')
    direction = 'backward' if 'transpose(' in path else 'forward'
    module = parts[-2] if len(parts) > 2 else '(top)'
    by_module[f'{module} ({direction})'] += micros / steps
    by_kind[f'{parts[-1]} ({direction})'] += micros / steps
  total = sum(by_module.values()) or 1.0
  table = lambda c: [{'name': k, 'us_per_step': v, 'share': v / total}
                     for k, v in c.most_common(_TOP.value)]
  return {'by_module': table(by_module), 'by_op_kind': table(by_kind)}


def main(argv):
  del argv
  load_start = [round(v, 2) for v in os.getloadavg()]
  peak = hardware.matmul_peak()
  step, args, config = _step_and_inputs()
  compiled = jax.jit(step).lower(*args).compile()
  flops = hardware.compiled_flops(step, *args)
  seconds = _median_seconds(compiled, args, _REPEATS.value)
  layers = _op_layers(compiled.as_text())
  totals = _profile(compiled, args, _PROFILE_STEPS.value)
  ops = {n: t for n, t in totals.items()
         if n in layers or n.split(':')[0] in layers}
  op_total = sum(ops.values())
  top = [{'op': n, 'layer': layers.get(n, layers.get(n.split(':')[0])),
          'us_per_step': t / _PROFILE_STEPS.value,
          'share_of_op_time': t / op_total if op_total else None}
         for n, t in sorted(ops.items(), key=lambda kv: -kv[1])[:_TOP.value]]
  out = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
      'model': config.model, 'batch_size': config.local.batch_size,
      'step_sec': seconds, 'step_gflop': None if flops is None else flops / 1e9,
      'matmul_peak': peak,
      'achieved': hardware.achieved(flops, seconds, peak['gflops']),
      'profiled_op_us_per_step': op_total / _PROFILE_STEPS.value,
      'largest_ops': top,
      **_grouped(ops, layers, _PROFILE_STEPS.value),
      'other_events_top': [
          {'name': n, 'us_per_step': t / _PROFILE_STEPS.value}
          for n, t in totals.most_common(12) if n not in ops],
      'loadavg_start': load_start,
      'loadavg_end': [round(v, 2) for v in os.getloadavg()],
  }
  print(json.dumps(out, indent=1))
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  cli.run(main, FLAGS)
