r"""Seconds per federated round against cohort size, per execution strategy.

One FedAvg round of `fedjax_ext` (4 local SGD steps of batch 5 on 20
Fashion-MNIST examples per client, the `ondevice.models` preset `--model`)
for cohorts of 10, 100 and 1,000 clients with

* 'vmap': one `jax.vmap` over the cohort;
* 'chunked': `lax.map` over chunks of `--chunk_size` vmapped clients
  (balanced by `execution.resolve_strategy`; the chunk used is reported);
* 'streamed': a scan over the clients that adds each weighted delta to a
  running sum (the CPU default of 'auto' for all but tiny client updates);
* 'sharded': the client axis split over 4 devices. It runs in a subprocess
  started with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag
  must be set before JAX starts), which also times 'vmap' on one of its
  devices, so the speed-up is measured under the same flags; the
  one-device 'vmap' of this (plain) process is the second baseline.

Host "devices" share the machine's cores: on C cores the sharded speed-up
over one device is at most about C (XLA already uses several threads for
one device's matmuls, so usually less).

Every configuration is compiled and run `--warmup` rounds untimed, then
`--rounds` rounds are timed (each to `block_until_ready`); the whole sweep
repeats `--repeats` times and the median over all timed rounds is reported
with min / max. The cohort is on the device before timing (for 'sharded',
split over the devices). The first two rounds of a sharded run compile
(the second sees the server state laid out by the first), hence warm-up 2.

Every row also reports its achieved GFLOP/s: XLA's cost analysis of one
local SGD step (`benchmarks.hardware.train_step_flops`) x local steps x
clients, over the median round time, and that rate as a fraction of a
1024 x 1024 float32 matmul's GFLOP/s measured in the same run (at the start
and at the end; the fraction is against the start).

Goal (issue 3): time per round grows linearly or better with cohort size,
i.e. 10x the clients costs at most about 10x the time.

    python -m benchmarks.fed_scaling \
        --out=benchmarks/results/fed_scaling/results.json

writes results.json and results.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import cli
from benchmarks import hardware
from fedjax_ext import algorithms
from fedjax_ext import client as client_lib
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import execution
from fedjax_ext import rounds as rounds_lib
from ondevice import metric_writer
from ondevice import models
from ondevice import train
from ondevice.data import images

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'results.json', 'JSON path; the markdown '
                           'table goes next to it with a .md suffix.',
                           flag_values=FLAGS)
_MODEL = flags.DEFINE_string('model', 'mlp_20k', 'ondevice.models preset.',
                             flag_values=FLAGS)
_COHORTS = flags.DEFINE_list('cohorts', ['10', '100', '1000'],
                             'Cohort sizes.', flag_values=FLAGS)
_SHARDED_COHORTS = flags.DEFINE_list('sharded_cohorts', ['100', '1000'],
                                     'Cohort sizes of the sharded runs '
                                     '(multiples of --devices).',
                                     flag_values=FLAGS)
_STRATEGIES = flags.DEFINE_list('strategies', ['vmap', 'chunked', 'streamed'],
                                'Single-device strategies.', flag_values=FLAGS)
_CHUNK = flags.DEFINE_integer('chunk_size', 32, "Clients per 'chunked' chunk.",
                              flag_values=FLAGS)
_DEVICES = flags.DEFINE_integer('devices', 4, 'Host devices of the sharded '
                                'run (0 skips it).', flag_values=FLAGS)
_EXAMPLES, _BATCH, _STEPS = cli.define_client_workload(FLAGS)
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds per repeat.',
                               flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed rounds per repeat.',
                               flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Sweeps over the configs.',
                                flag_values=FLAGS)
_WORKER = flags.DEFINE_string('worker_out', '', 'Internal: run the sharded '
                              'sweep in this process and write JSON here.',
                              flag_values=FLAGS)


def _dataset(num_clients: int):
  """`num_clients` x examples_per_client images, client i owns block i."""
  ds = images.load_fashion_mnist('train')
  n = num_clients * _EXAMPLES.value
  if n > len(ds):
    raise ValueError(f'{num_clients} clients x {_EXAMPLES.value} examples '
                     f'need {n} images; Fashion-MNIST has {len(ds)}.')
  index = np.random.default_rng(0).permutation(len(ds))[:n]
  ds = ds.take(index)
  return ds.__class__(
      x=ds.x, y=ds.y, client_id=np.repeat(
          np.arange(num_clients, dtype=np.int32), _EXAMPLES.value),
      class_names=ds.class_names)


def _algorithm(model, config: execution.ExecutionConfig):
  return algorithms.fedavg(
      train.classification_loss(model), optax.sgd(0.1),
      client_lib.LocalConfig(batch_size=_BATCH.value, num_steps=_STEPS.value),
      rounds=rounds_lib.RoundConfig(execution=config))


def _time_rounds(algorithm, state, cohort, ids) -> list[float]:
  """Warm-up rounds, then the seconds of each timed round."""
  times = []
  for r in range(_WARMUP.value + _ROUNDS.value):
    key = jax.random.fold_in(jax.random.key(1), r)
    start = time.perf_counter()
    state, _ = algorithm.apply(state, cohort, ids, key)
    jax.block_until_ready(state.params)
    if r >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  return times


def _sweep(configs: list[tuple[str, int]]) -> dict[str, Any]:
  """Times every (strategy, cohort size); returns {label: result}."""
  cohort_sizes = sorted({c for _, c in configs})
  ds = _dataset(max(cohort_sizes))
  pool = cohort_lib.ClientPool.from_dataset(ds)
  model = models.build_model(_MODEL.value, 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  params = variables['params']
  param_count = models.count_params(params)
  step_flops = hardware.train_step_flops(
      train.classification_loss(model), params,
      {k: v for k, v in variables.items() if k != 'params'},
      (_BATCH.value, 28, 28, 1), optax.sgd(0.1))
  cohorts = {}
  for size in cohort_sizes:
    ids = cohort_lib.sample_clients(jax.random.key(size), pool.sizes, size)
    cohorts[size] = (jax.device_put(cohort_lib.gather_cohort(
        ds, ids, _EXAMPLES.value, jax.random.key(2), pool)), ids)
  built = {}
  for strategy, size in configs:
    config = execution.ExecutionConfig(
        strategy, chunk_size=_CHUNK.value if strategy == 'chunked' else None)
    built[(strategy, size)] = (_algorithm(model, config), config)
  times = {k: [] for k in built}
  for repeat in range(_REPEATS.value):
    for (strategy, size), (algorithm, config) in built.items():
      cohort, ids = cohorts[size]
      if strategy == 'sharded':  # Each device already holds its clients.
        split = jax.sharding.NamedSharding(
            execution.client_mesh(config),
            jax.sharding.PartitionSpec(execution.CLIENT_AXIS))
        cohort, ids = jax.device_put((cohort, ids), split)
      times[(strategy, size)] += _time_rounds(
          algorithm, algorithm.init(params), cohort, ids)
      logging.info('repeat %d %s %d: %.4f s', repeat, strategy, size,
                   statistics.median(times[(strategy, size)]))
  out = {}
  for (strategy, size), (_, config) in built.items():
    _, chunk = execution.resolve_strategy(config, param_count, size,
                                          streamable=True)
    t = times[(strategy, size)]
    out[f'{strategy}/{size}'] = {
        'strategy': strategy, 'cohort': size,
        'chunk_size': chunk if strategy == 'chunked' else None,
        'devices': jax.device_count() if strategy == 'sharded' else 1,
        'sec_per_round': {'median': statistics.median(t), 'min': min(t),
                          'max': max(t), 'count': len(t)},
        'round_flops': hardware.scaled(step_flops, _STEPS.value, size)}
  return {'param_count': param_count, 'runs': out,
          'device_count': jax.device_count(), 'step_flops': step_flops}


def _add_achieved(runs: dict[str, Any] | None, peak_gflops: float) -> None:
  """Each run's round GFLOP, GFLOP/s and fraction of the matmul peak."""
  for run in (runs or {}).values():
    run['achieved'] = hardware.timed(
        run['round_flops'], run['sec_per_round']['median'], peak_gflops)


def _sharded_subprocess() -> dict[str, Any]:
  """Reruns this script with 4 host devices for 'sharded' and 'vmap'."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'sharded.json')
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_'
                        f'platform_device_count={_DEVICES.value}').strip()
    argv = [sys.executable, '-m', 'benchmarks.fed_scaling',
            f'--worker_out={path}'] + [
                f'--{k}={FLAGS[k].serialize().split("=", 1)[1]}'
                for k in ('model', 'sharded_cohorts', 'examples_per_client',
                          'batch_size', 'local_steps', 'rounds', 'warmup',
                          'repeats', 'devices')]
    subprocess.run(argv, env=env, check=True)
    with open(path) as f:
      return json.load(f)


def _worker():
  if jax.device_count() != _DEVICES.value:
    raise RuntimeError(f'Expected {_DEVICES.value} devices, got '
                       f'{jax.device_count()}; XLA_FLAGS was not applied.')
  sizes = [int(c) for c in _SHARDED_COHORTS.value]
  for size in sizes:
    if size % _DEVICES.value:
      raise ValueError(f'Sharded cohort {size} is not a multiple of '
                       f'{_DEVICES.value} devices.')
  configs = [(s, c) for c in sizes for s in ('vmap', 'sharded')]
  with open(_WORKER.value, 'w') as f:
    json.dump(_sweep(configs), f)


def _median(result, key):
  return result['runs'][key]['sec_per_round']['median']


def _summaries(single, sharded) -> tuple[list[dict], dict[str, float]]:
  rows, ratios = [], {}
  sizes = [int(c) for c in _COHORTS.value]
  for strategy in _STRATEGIES.value:
    for i, size in enumerate(sizes):
      run = single['runs'][f'{strategy}/{size}']
      t = run['sec_per_round']
      row = {'strategy': strategy, 'devices': 1, 'cohort': size,
             'chunk': run['chunk_size'] or '-', 's/round': t['median'],
             'min': t['min'], 'max': t['max'],
             'ms/client': 1000 * t['median'] / size,
             **hardware.table_columns(run['achieved'])}
      if i:
        growth = t['median'] / _median(single, f'{strategy}/{sizes[i - 1]}')
        row['time ratio vs previous'] = round(growth, 2)
        row['clients ratio'] = size // sizes[i - 1]
        ratios[f'{strategy}_{size}_over_{sizes[i - 1]}'] = growth
      rows.append(row)
  if sharded:
    for size in (int(c) for c in _SHARDED_COHORTS.value):
      for strategy in ('vmap', 'sharded'):
        run = sharded['runs'][f'{strategy}/{size}']
        t = run['sec_per_round']
        rows.append({'strategy': f'{strategy} (4-device process)',
                     'devices': run['devices'], 'cohort': size, 'chunk': '-',
                     's/round': t['median'], 'min': t['min'],
                     'max': t['max'], 'ms/client': 1000 * t['median'] / size,
                     **hardware.table_columns(run['achieved'])})
      ratios[f'sharded_speedup_{size}_vs_vmap_same_process'] = (
          _median(sharded, f'vmap/{size}') /
          _median(sharded, f'sharded/{size}'))
      if f'vmap/{size}' in single['runs']:
        ratios[f'sharded_speedup_{size}_vs_vmap_plain_process'] = (
            _median(single, f'vmap/{size}') /
            _median(sharded, f'sharded/{size}'))
  return rows, {k: round(v, 3) for k, v in ratios.items()}


def main(argv):
  del argv
  if _WORKER.value:
    _worker()
    return
  loadavg_start = [round(v, 2) for v in os.getloadavg()]
  peak_start = hardware.matmul_peak()
  configs = [(s, int(c)) for c in _COHORTS.value for s in _STRATEGIES.value]
  single = _sweep(configs)
  sharded = _sharded_subprocess() if _DEVICES.value > 1 else None
  peak_end = hardware.matmul_peak()
  _add_achieved(single['runs'], peak_start['gflops'])
  _add_achieved(sharded and sharded['runs'], peak_start['gflops'])
  rows, ratios = _summaries(single, sharded)
  out = {
      'config': {k: FLAGS[k].value for k in (
          'model', 'cohorts', 'sharded_cohorts', 'strategies', 'chunk_size',
          'devices', 'examples_per_client', 'batch_size', 'local_steps',
          'rounds', 'warmup', 'repeats')},
      'environment': {
          'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'device': jax.devices()[0].platform, 'cpu_count': os.cpu_count(),
          'platform': platform.platform(), 'jax': jax.__version__,
          'loadavg_start': loadavg_start,
          'loadavg_end': [round(v, 2) for v in os.getloadavg()],
          'matmul_peak_start': peak_start, 'matmul_peak_end': peak_end},
      'param_count': single['param_count'],
      'step_gflop': (None if single['step_flops'] is None else
                     single['step_flops'] / 1e9),
      'single_device': single['runs'],
      'sharded_process': sharded and sharded['runs'],
      'ratios': ratios,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1)
  env, c = out['environment'], out['config']
  text = (f"# Federated round time vs cohort size ({env['date']}, "
          f"{env['device']}, {env['cpu_count']} CPUs, jax {env['jax']})\n\n"
          f"FedAvg, `{c['model']}` ({out['param_count']} params), "
          f"{c['examples_per_client']} examples per client, "
          f"{c['local_steps']} local steps of batch {c['batch_size']}. "
          f"Median of {c['rounds']} timed rounds x {c['repeats']} repeats "
          f"after {c['warmup']} warm-up rounds. Load average "
          f"{env['loadavg_start']} at the start, {env['loadavg_end']} at "
          f"the end. GFLOP/s: XLA's FLOPs of one local step x "
          f"{c['local_steps']} steps x the cohort, over the median round. "
          f"{hardware.peak_text(peak_start, peak_end)}\n\n" + metric_writer.markdown_table(rows) +
          '\n\nRatios: ' + json.dumps(ratios, indent=1) + '\n')
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  cli.run(main, FLAGS)
