r"""Round cost against population size with a population stored on disk.

A synthetic population (`client_store.synthetic_store`: random log-mel-shaped
98x40 features stored as int16, 2-6 utterances per client, random labels) is
built once per size under `--store_root` (about 31 KB per client: ~310 MB for
10,000 clients). For each population size, one round is

  sample (uniform, without replacement: `ClientStore.sample`, Floyd's
  algorithm, whose cost does not grow with the population) -> gather the
  cohort from the store
  (reads only its rows) -> one jitted FedAvg round of a small MLP on it,

for a fixed cohort. The FedAvg program depends only on the cohort's shape,
so it is compiled once and shared by every population size. The machine is
shared: population sizes are interleaved (in a fresh random order in every
repeat), every round is timed, the median is reported, and
`os.getloadavg()` is recorded around every repeat.

Every population's row also reports achieved GFLOP/s: XLA's FLOPs of one
local SGD step (`benchmarks.hardware.train_step_flops`) x local steps x
cohort over the median round (sample and gather included, so this is the
rate the whole round achieves), and its fraction of a 1024 x 1024 float32
matmul's GFLOP/s measured at the start and end of the same run.

The peak host memory (`resource.getrusage(...).ru_maxrss`) of a run of the
largest population is measured in a fresh subprocess that opens its store
and runs `--memory_rounds` rounds.

`multiprocess_max_abs_diff`: `scripts/launch_local.sh` runs
`scripts/multiprocess_fedavg.py` with 2 processes (Gloo collectives, one CPU
device each, every process gathering only its half of each cohort) and with 1
process on the smallest store; the largest absolute difference of the final
server params is reported.

    python -m benchmarks.scale --out_dir=benchmarks/results/scale

writes results.json and results.md there.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
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
from fedjax_ext import execution
from fedjax_ext import rounds as rounds_lib
from ondevice import models
from ondevice import train
from ondevice.data import client_store

FLAGS = flags.FlagValues()
_OUT_DIR = flags.DEFINE_string('out_dir', 'benchmarks/results/scale',
                               'Where results.json and results.md go.',
                               flag_values=FLAGS)
_STORE_ROOT = flags.DEFINE_string('store_root', '/tmp/ondevice_scale_stores',
                                  'Where the synthetic stores are built.',
                                  flag_values=FLAGS)
_POPULATIONS = flags.DEFINE_list('populations', ['160', '1000', '10000'],
                                 'Population sizes.', flag_values=FLAGS)
_COHORT = flags.DEFINE_integer('cohort_size', 10, 'Clients per round.',
                               flag_values=FLAGS)
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 4, 'Examples per '
                                     'client in a cohort.', flag_values=FLAGS)
_MODEL = flags.DEFINE_string('model', 'mlp_20k', 'ondevice.models preset.',
                             flag_values=FLAGS)
_STEPS = flags.DEFINE_integer('local_steps', 2, 'Local SGD steps.',
                              flag_values=FLAGS)
_BATCH = flags.DEFINE_integer('batch_size', 2, 'Local batch size.',
                              flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Sweeps.', flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds per population '
                               'and sweep (round-robin over populations).',
                               flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer('warmup', 20, 'Untimed-in-the-median rounds '
                               'per population before the sweeps.',
                               flag_values=FLAGS)
_MEMORY_ROUNDS = flags.DEFINE_integer('memory_rounds', 10, 'Rounds of the '
                                      'peak-memory subprocess.',
                                      flag_values=FLAGS)
_MULTIPROCESS = flags.DEFINE_bool('multiprocess', True, 'Also compare 2 '
                                  'processes with 1.', flag_values=FLAGS)
_MEMORY_WORKER = flags.DEFINE_integer('memory_worker', 0, 'Internal: run '
                                      'this population and print peak RSS.',
                                      flag_values=FLAGS)


def _store(population: int) -> client_store.ClientStore:
  root = os.path.join(_STORE_ROOT.value, f'pop_{population}')
  start = time.perf_counter()
  store = client_store.synthetic_store(root, population)
  logging.info('Store of %d clients ready in %.1f s.', population,
               time.perf_counter() - start)
  return store


def _disk_bytes(root: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(root) for f in files)


def _round_parts(num_classes: int, feature_shape):
  """(algorithm, initial state, param count, XLA FLOPs of one round)."""
  model = models.build_model(_MODEL.value, num_classes)
  params = model.init(jax.random.key(0),
                      jnp.zeros((1,) + tuple(feature_shape)))['params']
  loss_fn = train.classification_loss(model)
  algorithm = algorithms.fedavg(
      loss_fn, optax.sgd(0.05),
      client_lib.LocalConfig(batch_size=_BATCH.value, num_steps=_STEPS.value),
      rounds=rounds_lib.RoundConfig(
          execution=execution.ExecutionConfig('vmap')))
  step_flops = hardware.train_step_flops(
      loss_fn, params, {}, (_BATCH.value,) + tuple(feature_shape),
      optax.sgd(0.05))
  return (algorithm, algorithm.init(params), models.count_params(params),
          hardware.scaled(step_flops, _STEPS.value, _COHORT.value))


def _one_round(algorithm, state, store, r: int) -> tuple[Any, float, float]:
  """Sample + gather + FedAvg; returns (state, gather s, total s)."""
  key = jax.random.fold_in(jax.random.key(1), r)
  start = time.perf_counter()
  ids = store.sample(jax.random.fold_in(key, 0), _COHORT.value)
  cohort = store.gather(ids, _MAX_EXAMPLES.value, jax.random.fold_in(key, 1))
  gathered = time.perf_counter()
  state, _ = algorithm.apply(state, cohort, ids, key)
  jax.block_until_ready(state.params)
  end = time.perf_counter()
  return state, gathered - start, end - start


def _memory_worker(population: int) -> None:
  """Opens the store, runs rounds, prints {'peak_host_mb': ...} as JSON."""
  store = client_store.open_store(
      os.path.join(_STORE_ROOT.value, f'pop_{population}'))
  algorithm, state, _, _ = _round_parts(len(store.class_names),
                                        store.feature_shape)
  for r in range(_MEMORY_ROUNDS.value):
    state, _, _ = _one_round(algorithm, state, store, r)
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
  print(json.dumps({'peak_host_mb': peak_kb / 1024,
                    'rounds': _MEMORY_ROUNDS.value,
                    'population': population}))


def _timings(stores: dict[int, client_store.ClientStore]) -> dict[str, Any]:
  """Per population the seconds of every round, round-robin interleaved.

  The first `--warmup` rounds of each population (compilation, first
  mapping of its shards, first page faults) are timed but kept apart.
  """
  any_store = next(iter(stores.values()))
  algorithm, state, param_count, round_flops = _round_parts(
      len(any_store.class_names), any_store.feature_shape)
  warm = {p: [] for p in stores}
  for r in range(_WARMUP.value):
    for p, store in stores.items():
      state, _, t = _one_round(algorithm, state, store, r)
      warm[p].append(t)
  total = {p: [] for p in stores}
  gather = {p: [] for p in stores}
  loads = []
  rng = np.random.default_rng(0)
  for repeat in range(_REPEATS.value):
    before = os.getloadavg()
    for r in range(_ROUNDS.value):
      for p in rng.permutation(sorted(stores)).tolist():
        state, g, t = _one_round(algorithm, state, stores[p],
                                 1000 * (repeat + 1) + r)
        gather[p].append(g)
        total[p].append(t)
    loads.append({'repeat': repeat, 'before': before,
                  'after': os.getloadavg()})
    logging.info('repeat %d: %s', repeat, {
        p: round(statistics.median(v), 4) for p, v in total.items()})
  return {'param_count': param_count, 'total': total, 'gather': gather,
          'warmup': warm, 'loadavg': loads, 'round_flops': round_flops}


def _peak_memory(population: int) -> dict[str, Any]:
  argv = [sys.executable, '-m', 'benchmarks.scale',
          f'--memory_worker={population}',
          f'--store_root={_STORE_ROOT.value}',
          f'--memory_rounds={_MEMORY_ROUNDS.value}'] + [
              f'--{k}={FLAGS[k].value}'
              for k in ('cohort_size', 'max_examples', 'model', 'local_steps',
                        'batch_size')]
  out = subprocess.run(argv, check=True, capture_output=True, text=True,
                       timeout=900)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _multiprocess_diff(store_dir: str) -> dict[str, Any]:
  """Max |params(2 processes) - params(1 process)| after 2 rounds."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  worker = [sys.executable, os.path.join(root, 'scripts',
                                         'multiprocess_fedavg.py'),
            f'--store={store_dir}', f'--cohort_size={_COHORT.value}',
            f'--max_examples={_MAX_EXAMPLES.value}', '--rounds=2',
            f'--model={_MODEL.value}', '--timeout_s=120']
  with tempfile.TemporaryDirectory() as tmp:
    one, two = os.path.join(tmp, 'one.npz'), os.path.join(tmp, 'two.npz')
    subprocess.run(worker + ['--num_processes=1', f'--out={one}'],
                   check=True, capture_output=True, timeout=600)
    subprocess.run([os.path.join(root, 'scripts', 'launch_local.sh'), '2',
                    '--port=12391', '--timeout=500', '--'] + worker +
                   [f'--out={two}'], check=True, capture_output=True,
                   timeout=600)
    a, b = np.load(one), np.load(two)
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    scale = max(float(np.max(np.abs(a[k]))) for k in a)
    with open(os.path.splitext(two)[0] + '.json') as f:
      info = json.load(f)
  ulp = float(np.spacing(np.float32(scale)))
  return {'max_abs_diff': diff, 'max_abs_param': scale,
          'max_diff_ulps': diff / ulp,
          'bit_identical': diff == 0.0, 'rounds': 2,
          'process_count': info['process_count']}


def _summary(timings, populations, peak_gflops: float) -> dict[str, Any]:
  out = {}
  for p in populations:
    t, g = timings['total'][p], timings['gather'][p]
    w = timings['warmup'][p]
    out[str(p)] = {'median': statistics.median(t), 'min': min(t),
                   'max': max(t), 'count': len(t),
                   'gather_median': statistics.median(g),
                   'warmup_median': statistics.median(w[1:]) if len(w) > 1
                                    else None,
                   'achieved': hardware.timed(timings['round_flops'],
                                              statistics.median(t),
                                              peak_gflops)}
  return out


def _markdown(results: dict[str, Any]) -> str:
  pops = results['populations']
  rows = results['round_detail']
  lines = [
      '# Round cost against population size (client store on disk)', '',
      f"Generated {results['generated']} on {results['platform']}, "
      f"{results['cpu_count']} CPUs, JAX {results['jax']}.", '',
      f"Cohort {results['cohort_size']} clients x {results['max_examples']} "
      f"examples of synthetic 98x40 int16 log-mel features (2-6 utterances "
      f"per client); model {results['model']} ({results['param_count']} "
      f"params), FedAvg with {results['local_steps']} local steps. A round "
      'is sample + gather from the store + one jitted FedAvg round. '
      f"{results['repeats']} sweeps x {results['rounds']} rounds per "
      'population, populations interleaved round by round in a random '
      f"order; median (min-max). The first {results['warmup']} rounds of "
      'each population (compilation, first mapping of its shards) are '
      "reported apart ('warm-up s', median without the first round). "
      "GFLOP/s: XLA's FLOPs of one local step x steps x cohort "
      f"({_gflop_text(results)} GFLOP per round) over the median round. "
      + hardware.peak_text(results.get('matmul_peak_start'),
                           results.get('matmul_peak_end')),
      '',
      '| population | store on disk (MB) | s / round | sample + gather s | '
      'warm-up s | ratio to smallest | GFLOP | GFLOP/s | % of peak |',
      '|---|---|---|---|---|---|---|---|---|']
  base = rows[str(pops[0])]['median']
  for p in pops:
    r = rows[str(p)]
    lines.append(
        f"| {p:,} | {results['store_mb'][str(p)]:.0f} | {r['median']:.4f} "
        f"({r['min']:.4f}-{r['max']:.4f}) | {r['gather_median']:.4f} | "
        f"{r['warmup_median'] or float('nan'):.4f} | "
        f"{r['median'] / base:.3f} | "
        + ' | '.join(str(v) for v in hardware.table_columns(
            r.get('achieved', {})).values()) + ' |')
  mp = results.get('multiprocess', {})
  lines += [
      '', f"Peak host memory of a {pops[-1]:,}-client run "
      f"({results['memory_rounds']} rounds, fresh process, ru_maxrss): "
      f"**{results['peak_host_mb_10k']:.0f} MB**; the same run on "
      f"{pops[0]:,} clients peaks at "
      f"{results['peak_host_mb_smallest']:.0f} MB (the JAX runtime and the "
      'compiled round are most of it). Held in memory as float32, the '
      f"{pops[-1]:,}-client features alone would take "
      f"{results['float32_features_mb'][str(pops[-1])]:.0f} MB.", '',
      f"Load average (1/5/15 min) during the sweeps: "
      f"{results['loadavg_range']}.", '']
  if mp:
    lines += [
        f"2 processes vs 1 (jax.distributed on localhost, Gloo, 2 rounds): "
        f"max |difference| of the server params "
        f"**{results['multiprocess_max_abs_diff']:.3g}**, "
        f"{mp['max_diff_ulps']:.1f} float32 spacings (ulps) at the largest "
        f"param ({mp['max_abs_param']:.3g}). Two processes add the client "
        'deltas in two partial sums and then all-reduce them; one process '
        'adds them in one sum. float32 addition is not associative, so the '
        'two differ by rounding, not by what is computed.', '']
  lines += ['Goals: round time at 10,000 clients within 10% of 160; peak '
            'host memory <= 2 GB; 2-process run matches 1-process (here: '
            'within 8 float32 ulps of the largest param).', '',
            results['goals_text'], '']
  return '\n'.join(lines)


def _gflop_text(results: dict[str, Any]) -> str:
  flops = results.get('round_flops')
  return '-' if flops is None else f'{flops / 1e9:.4g}'


def _goals(results: dict[str, Any]) -> str:
  pops = results['populations']
  ratio = (results['round_detail'][str(pops[-1])]['median'] /
           results['round_detail'][str(pops[0])]['median'])
  lines = [
      f"- Round time at {pops[-1]:,} / at {pops[0]:,}: {ratio:.3f} "
      f"({'met' if ratio <= 1.10 else 'NOT met'}: <= 1.10).",
      f"- Peak host memory {results['peak_host_mb_10k']:.0f} MB "
      f"({'met' if results['peak_host_mb_10k'] <= 2048 else 'NOT met'}: "
      '<= 2048 MB).']
  if results.get('multiprocess_max_abs_diff') is not None:
    ulps = results['multiprocess']['max_diff_ulps']
    lines.append(
        f"- 2 vs 1 processes: max abs diff "
        f"{results['multiprocess_max_abs_diff']:.3g} = {ulps:.1f} ulps of "
        f"the largest param ({'met' if ulps <= 8 else 'NOT met'}: within "
        '8 float32 ulps, rounding of a differently ordered sum).')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _MEMORY_WORKER.value:
    _memory_worker(_MEMORY_WORKER.value)
    return
  populations = sorted(int(p) for p in _POPULATIONS.value)
  stores = {p: _store(p) for p in populations}
  peak_start = hardware.matmul_peak()
  timings = _timings(stores)
  peak_end = hardware.matmul_peak()
  rows = _summary(timings, populations, peak_start['gflops'])
  memory = _peak_memory(populations[-1])
  memory_smallest = _peak_memory(populations[0])
  mp = (_multiprocess_diff(stores[populations[0]].root)
        if _MULTIPROCESS.value else {})
  loads = [v for l in timings['loadavg'] for v in (l['before'], l['after'])]
  results = {
      'round_seconds_by_population': {str(p): rows[str(p)]['median']
                                      for p in populations},
      'peak_host_mb_10k': memory['peak_host_mb'],
      'multiprocess_max_abs_diff': mp.get('max_abs_diff'),
      'round_detail': rows, 'populations': populations,
      'round_flops': timings['round_flops'],
      'matmul_peak_start': peak_start, 'matmul_peak_end': peak_end,
      'store_mb': {str(p): _disk_bytes(s.root) / 2 ** 20
                   for p, s in stores.items()},
      'store_examples': {str(p): s.num_examples for p, s in stores.items()},
      'multiprocess': mp, 'memory': memory,
      'peak_host_mb_smallest': memory_smallest['peak_host_mb'],
      'float32_features_mb': {
          str(p): s.num_examples * int(np.prod(s.feature_shape)) * 4 / 2 ** 20
          for p, s in stores.items()},
      'loadavg': timings['loadavg'],
      'loadavg_range': (f'{min(l[0] for l in loads):.1f}-'
                        f'{max(l[0] for l in loads):.1f} (1 min)'),
      'cohort_size': _COHORT.value, 'max_examples': _MAX_EXAMPLES.value,
      'model': _MODEL.value, 'param_count': timings['param_count'],
      'local_steps': _STEPS.value, 'repeats': _REPEATS.value,
      'warmup': _WARMUP.value,
      'rounds': _ROUNDS.value, 'memory_rounds': _MEMORY_ROUNDS.value,
      'generated': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'platform': platform.platform(), 'cpu_count': os.cpu_count(),
      'jax': jax.__version__,
  }
  results['goals_text'] = _goals(results)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(_OUT_DIR.value, 'results.md'), 'w') as f:
    f.write(_markdown(results))
  print(_markdown(results))


if __name__ == '__main__':
  cli.run(main, FLAGS)
