r"""The composed config's device costs against float32 full training.

configs/fed_personalize_kws.py trains bias-only in int8 with stochastic
rounding and sends int8 deltas; its reference is the same model in float32,
training and sending every leaf. This measures, on the full-size model of
that config (group-norm DS-CNN S), what one client pays per on-device step
and per round, side by side in one run:

* bytes up per client per round: the int8 encoding of the bias leaves
  (`compression.quantized_bytes`) against every leaf as float32;
* compiled training memory of one on-device SGD step at the config's batch
  (`ondevice.cost.compiled_cost`, XLA's memory analysis, peak bytes);
* step time: medians of interleaved calls of the two jitted steps, with
  XLA's FLOPs of each step (the same compiled analysis), achieved GFLOP/s
  and its fraction of a 1024 x 1024 float32 matmul's GFLOP/s measured at the
  start and end of the same run (`benchmarks.hardware`).

    python -m benchmarks.fed_personalize_costs \
        --out=benchmarks/results/fed_personalize/results.json

results.json also carries `secagg_overhead` (from
benchmarks/results/secagg/results.json) and the accuracy goals' state: the
personalised accuracies need full federated runs and are null until run.
"""
from __future__ import annotations

import datetime
import json
import os
import time

from absl import flags
import jax
import numpy as np
import optax

from benchmarks import cli
from benchmarks import hardware
from benchmarks import outputs
from configs import fed_personalize_kws
from fedjax_ext import compression
from ondevice import cost
from ondevice import logs
from ondevice import metric_writer
from ondevice import models
from ondevice import train
import quantized_training
from sparse_updates import presets

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'results.json', 'JSON path; the markdown '
                           'goes beside it.', flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per side.',
                                flag_values=FLAGS)
_SECAGG = 'benchmarks/results/secagg/results.json'


def side(config, quant: str, trainable: str) -> dict:
  """The model, its step, state and a batch for one side."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.model_kwargs.items()}
  model = models.build_model(
      config.model, 36, norm=config.norm,
      **kwargs, **quantized_training.get_quant(quant).model_kwargs())
  x = np.zeros((config.local.batch_size, 98, 40), np.float32)
  params = model.init(jax.random.key(0), x[:1], train=False)['params']
  paths = (None if trainable == 'full' else
           presets.resolve(trainable, params).paths)
  optimizer = optax.sgd(config.client_learning_rate)
  state = train.init_state(model, optimizer, x[:1], jax.random.key(0), paths)
  batch = {'x': x, 'y': np.zeros(len(x), np.int32),
           'mask': np.ones(len(x), np.float32)}
  step = train.make_train_step(train.classification_loss(model), optimizer,
                               train.resolve_trainable(state.params, paths))
  flat = train.flatten_params(state.params)
  sent = {p: flat[p] for p in train.resolve_trainable(state.params, paths)}
  return {'step': step, 'state': state, 'batch': batch, 'sent': sent}


def measure(repeats: int, peak_gflops: float) -> dict:
  config = fed_personalize_kws.get_config()
  sides = {'composed': side(config, config.quant, config.trainable.name),
           'float32_full': side(config, 'none', 'full')}
  out = {}
  for name, s in sides.items():
    compiled = cost.compiled_cost(s['step'], s['state'], s['batch'],
                                  jax.random.key(1))
    out[name] = {'peak_bytes': compiled.peak_bytes,
                 'step_flops': compiled.flops or None}
  out['composed']['bytes_up'] = compression.quantized_bytes(
      sides['composed']['sent'], 8)
  out['float32_full']['bytes_up'] = cost.bytes_of_tree(
      sides['float32_full']['sent'])
  jitted = {n: jax.jit(s['step']) for n, s in sides.items()}
  for n, s in sides.items():  # Compile outside the timing.
    jax.block_until_ready(jitted[n](s['state'], s['batch'], jax.random.key(1)))
  times = {n: [] for n in sides}
  for r in range(repeats):
    for n, s in sides.items():  # Interleaved.
      t0 = time.perf_counter()
      jax.block_until_ready(jitted[n](s['state'], s['batch'],
                                      jax.random.key(r)))
      times[n].append(time.perf_counter() - t0)
  for n in sides:
    out[n]['step_seconds'] = float(np.median(times[n]))
    out[n]['achieved'] = hardware.timed(out[n]['step_flops'],
                                        out[n]['step_seconds'], peak_gflops)
  return out


def results_of(costs: dict, peaks: tuple[dict, dict]) -> dict:
  c, f = costs['composed'], costs['float32_full']
  secagg = None
  if os.path.exists(_SECAGG):
    with open(_SECAGG) as fh:
      secagg = {str(r['cohort']): r['dp_secure_vs_dp_central']
                for r in json.load(fh)['secagg_overhead']}
  return {
      'personalized_k5': None,  # Needs the federated runs; not run yet.
      'composed_vs_float': {
          'accuracy_delta': None,  # Likewise.
          'bytes_ratio': c['bytes_up'] / f['bytes_up'],
          'memory_ratio': c['peak_bytes'] / f['peak_bytes'],
          'step_time_ratio': c['step_seconds'] / f['step_seconds']},
      'secagg_overhead': secagg,
      'costs': costs,
      'matmul_peak_start': peaks[0], 'matmul_peak_end': peaks[1],
      'loadavg': [round(x, 2) for x in os.getloadavg()],
      'date': datetime.datetime.now().isoformat(timespec='seconds')}


def markdown(results: dict) -> str:
  costs = results['costs']
  rows = [{'side': name, 'bytes up / round': c['bytes_up'],
           'compiled step memory (bytes)': c['peak_bytes'],
           'step time (ms)': 1e3 * c['step_seconds'],
           **hardware.table_columns(c.get('achieved', {}))}
          for name, c in costs.items()]
  ratios = results['composed_vs_float']
  return '\n'.join([
      '# The composed config against float32 full training', '',
      'configs/fed_personalize_kws.py (int8 fwd+bwd with stochastic '
      'rounding, bias-only, int8 deltas) vs the same group-norm DS-CNN S in '
      'float32 training every leaf; one on-device SGD step at batch 8. '
      f'{results["date"]}, load average {results["loadavg"]} (shared '
      '2-core machine: the step-time ratio is of interleaved calls). '
      "GFLOP/s: XLA's FLOPs of the step over its median time. "
      + hardware.peak_text(results.get('matmul_peak_start'),
                           results.get('matmul_peak_end')), '',
      metric_writer.markdown_table(rows), '',
      f'Ratios composed / float32: bytes {ratios["bytes_ratio"]:.3f}, '
      f'memory {ratios["memory_ratio"]:.3f}, step time '
      f'{ratios["step_time_ratio"]:.3f}. Personalised accuracies '
      '(`personalized_k5`, `accuracy_delta`) are not measured yet: they need '
      'the 100-speaker x 6-clip corpus and full federated runs.', ''])


def main(argv):
  del argv
  logs.setup_experiment_logging()
  peak_start = hardware.matmul_peak()
  costs = measure(_REPEATS.value, peak_start['gflops'])
  results = results_of(costs, (peak_start, hardware.matmul_peak()))
  outputs.write(_OUT.value, results, markdown(results))


if __name__ == '__main__':
  cli.run(main, FLAGS)
