r"""What secure aggregation adds to a round's aggregation, per cohort size.

Times one jitted aggregation of a cohort's updates of the main job's model
size (DS-CNN S of configs/fed_kws.py) four ways, interleaved so that load
on the machine hits all of them alike: the plain weighted mean, the
secure weighted mean (`secure_aggregation.secure_weighted_mean`), central
DP-FedAvg (`privacy.dp_aggregator`) and DP-FedAvg through secure
aggregation (`secure_dp.secure_dp_aggregator`). Ratios are to the plain
mean, and, as a share of a whole round, to the measured time of the round
(client training included) of the same cohort.

    python -m benchmarks.secagg_overhead \
        --out=benchmarks/results/secagg/results.json

Each aggregation also reports XLA's FLOPs of its jitted call
(`benchmarks.hardware`), achieved GFLOP/s at the median and its fraction of
a 1024 x 1024 float32 matmul's GFLOP/s measured at the start and end of the
same run. Aggregation is elementwise work and random draws, bound by memory
and the PRNG rather than by multiply-adds, so expect small fractions.

Secure aggregation draws one mask per pair of clients, so its cost grows as
C^2 * D for C clients and D parameters (`secure_aggregation.py`).
"""
from __future__ import annotations

import datetime
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cli
from benchmarks import hardware
from benchmarks import outputs
from configs import fed_kws
from fedjax_ext import privacy
from fedjax_ext import rounds as rounds_lib
from fedjax_ext import secure_aggregation
from fedjax_ext import secure_dp
from ondevice import logs
from ondevice import metric_writer
from ondevice import models
from ondevice import train

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'results.json', 'JSON path; the markdown '
                           'goes beside it.', flag_values=FLAGS)
_COHORTS = flags.DEFINE_list('cohorts', ['10', '100'], 'Cohort sizes.',
                             flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per method.',
                                flag_values=FLAGS)


def main_job_params() -> dict[str, jax.Array]:
  """The trainable leaves of configs/fed_kws.py's model, flat."""
  config = fed_kws.get_config()
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.model_kwargs.items()}
  model = models.build_model(config.model, 36, norm=config.norm, **kwargs)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 98, 40)))
  return train.flatten_params(variables['params'])


def aggregators_for(cohort: int) -> dict:
  """name -> jitted (stacked, weights, key) -> aggregate."""
  dp = privacy.DPConfig(noise_multiplier=1.0, clip_norm=1.0,
                        expected_num_clients=cohort)
  central, distributed = (privacy.dp_aggregator(dp),
                          secure_dp.secure_dp_aggregator(dp, cohort))
  # Weighted updates of <= 128 examples times |delta| <= 1.
  scale = secure_aggregation.fixed_point_scale(128.0, cohort)
  fns = {
      'mean': lambda s, w, k: rounds_lib.weighted_mean(s, w, k)[0],
      'secure_mean': lambda s, w, k: secure_aggregation.secure_weighted_mean(
          scale)(s, w, k)[0],
      'dp_central': lambda s, w, k: central.aggregate(central.init(), s, w,
                                                      k)[0],
      'dp_secure': lambda s, w, k: distributed.aggregate(
          distributed.init(), s, w, k)[0],
  }
  return {name: jax.jit(fn) for name, fn in fns.items()}


def time_cohort(params, cohort: int, repeats: int,
                peak_gflops: float) -> dict:
  rng = np.random.default_rng(cohort)
  stacked = {k: jnp.asarray(rng.normal(scale=1e-2, size=(cohort,) + v.shape),
                            jnp.float32) for k, v in params.items()}
  weights = jnp.asarray(rng.integers(50, 128, cohort), jnp.float32)
  fns = aggregators_for(cohort)
  for fn in fns.values():  # Compile outside the timing.
    jax.block_until_ready(fn(stacked, weights, jax.random.key(0)))
  times = {name: [] for name in fns}
  for r in range(repeats):
    for name, fn in fns.items():  # Interleaved.
      t0 = time.perf_counter()
      jax.block_until_ready(fn(stacked, weights, jax.random.key(r)))
      times[name].append(time.perf_counter() - t0)
  median = {name: float(np.median(t)) for name, t in times.items()}
  # The jitted calls' executables are cached: no compilation here.
  achieved = {name: hardware.timed(
      hardware.compiled_flops(fn, stacked, weights, jax.random.key(0)),
      median[name], peak_gflops) for name, fn in fns.items()}
  return {'cohort': cohort, 'seconds': median, 'achieved': achieved,
          'secure_mean_vs_mean': median['secure_mean'] / median['mean'],
          'dp_secure_vs_dp_central': median['dp_secure'] / median['dp_central'],
          'dp_secure_vs_mean': median['dp_secure'] / median['mean']}


def markdown(results: dict) -> str:
  rows = [{'cohort': r['cohort'],
           'mean (ms)': 1e3 * r['seconds']['mean'],
           'secure mean (ms)': 1e3 * r['seconds']['secure_mean'],
           'DP central (ms)': 1e3 * r['seconds']['dp_central'],
           'DP + SecAgg (ms)': 1e3 * r['seconds']['dp_secure'],
           'SecAgg / mean': r['secure_mean_vs_mean'],
           'DP+SecAgg / DP': r['dp_secure_vs_dp_central']}
          for r in results['secagg_overhead']]
  flops_rows = [{'cohort': r['cohort'], 'aggregation': name,
                 **hardware.table_columns(a)}
                for r in results['secagg_overhead']
                for name, a in r.get('achieved', {}).items()]
  return '\n'.join([
      '# Secure aggregation overhead per round', '',
      f'Aggregation of {results["num_params"]} parameters (the main job\'s '
      'DS-CNN S) per cohort; medians of interleaved calls, '
      f'{results["machine"]}. Load average at start / end: '
      f'{results["loadavg_start"]} / {results["loadavg_end"]}.', '',
      metric_writer.markdown_table(rows), '',
      "XLA's FLOPs of each aggregation and the rate achieved at its median "
      'time. ' + hardware.peak_text(results.get('matmul_peak_start'),
                                   results.get('matmul_peak_end')), '',
      metric_writer.markdown_table(flops_rows), ''])


def main(argv):
  del argv
  logs.setup_experiment_logging()
  load_start = os.getloadavg()
  params = main_job_params()
  peak_start = hardware.matmul_peak()
  rows = [time_cohort(params, int(c), _REPEATS.value, peak_start['gflops'])
          for c in _COHORTS.value]
  results = {'secagg_overhead': rows,
             'matmul_peak_start': peak_start,
             'matmul_peak_end': hardware.matmul_peak(),
             'num_params': int(sum(v.size for v in params.values())),
             'machine': f'{os.cpu_count()} CPU cores, {jax.default_backend()}',
             'loadavg_start': [round(x, 2) for x in load_start],
             'loadavg_end': [round(x, 2) for x in os.getloadavg()],
             'date': datetime.date.today().isoformat()}
  outputs.write(_OUT.value, results, markdown(results))


if __name__ == '__main__':
  cli.run(main, FLAGS)
