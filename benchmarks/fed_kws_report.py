r"""Federated KWS against the centralised main job: rounds, accuracy, time.

Two modes:

* `--mode=time`: steady-state seconds per federated round of
  `configs/fed_kws.py` (with `--override`s) and seconds per step of the
  centralised job (`configs/kws_central.py`) in the same process, as wall and
  process CPU time. On a loaded machine the CPU-time ratio of the two, times
  the centralised job's measured idle time, estimates the federated run's idle
  time. Both report XLA's FLOPs of what they time (one local step x
  local steps x cohort for a round, one step for the centralised job),
  achieved GFLOP/s and its fraction of a 1024 x 1024 float32 matmul's
  GFLOP/s measured at the start and end of the same run; the JSON gets a
  markdown table beside it. `--smoke` times the configs' smoke variants.
* `--mode=report`: turns the metrics.jsonl / final_metrics.json of finished
  runs (`--run=name:workdir`) into results.json, results.md and
  accuracy_vs_round.png, with the rounds each run needed to come within
  `--margin` of the centralised accuracy.

    python -m benchmarks.fed_kws_report --mode=time --rounds=10 \
        --out=/tmp/fed_time.json
    python -m benchmarks.fed_kws_report --mode=time --smoke --rounds=1 \
        --steps=2 --out=/tmp/fed_time_smoke.json
    python -m benchmarks.fed_kws_report --mode=report \
        --run=default:/tmp/fed_kws --central_workdir=/tmp/kws_central \
        --timing=/tmp/fed_time.json --out_dir=benchmarks/results/fed_kws
"""
from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import cli
from benchmarks import hardware
from configs import fed_kws
from configs import kws_central
from fedjax_ext import experiment
from fedjax_ext import federated_loop
from fedjax_ext import training
from ondevice import metric_writer
from ondevice import models
from ondevice import optim
from ondevice import train
from ondevice.data import registry

FLAGS = flags.FlagValues()
_MODE = flags.DEFINE_enum('mode', 'report', ['time', 'report'], 'What to do.',
                          flag_values=FLAGS)
_OVERRIDE = flags.DEFINE_multi_string(
    'override', [], 'key=value on configs/fed_kws.py, e.g. cohort_size=10 '
    'or local.num_steps=16 (values parsed as JSON, else strings).',
    flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds (after warm-up).',
                               flag_values=FLAGS)
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed centralised steps.',
                              flag_values=FLAGS)
_RUN = flags.DEFINE_multi_string('run', [], 'name:workdir of a finished '
                                 'federated run (report mode).',
                                 flag_values=FLAGS)
_CENTRAL = flags.DEFINE_string('central_workdir', '', 'Workdir of a finished '
                               'centralised run (report mode).',
                               flag_values=FLAGS)
_TIMING = flags.DEFINE_multi_string('timing', [], 'JSONs written by '
                                    '--mode=time.', flag_values=FLAGS)
_MARGIN = flags.DEFINE_float('margin', 0.03, 'Target = central - margin.',
                             flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', '', 'JSON output of --mode=time (the '
                           'markdown table goes beside it, .md).',
                           flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool('smoke', False, "--mode=time on the configs' "
                           'smoke variants (seconds, not a measurement).',
                           flag_values=FLAGS)
_OUT_DIR = flags.DEFINE_string('out_dir', 'benchmarks/results/fed_kws',
                               'Report directory.', flag_values=FLAGS)


def _apply_overrides(config, overrides):
  for item in overrides:
    key, _, raw = item.partition('=')
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _clock():
  return time.perf_counter(), time.process_time()


def _time_loop(one, state, count: int, warmup: int = 2
               ) -> tuple[float, float, float]:
  """Runs `state = one(state, i)` warmup + count times.

  Returns (wall seconds of the warm-up, then wall and process-CPU seconds
  per timed call).
  """
  wall0, _ = _clock()
  for i in range(warmup):
    state = one(state, i)
  wall1, cpu1 = _clock()
  for i in range(warmup, warmup + count):
    state = one(state, i)
  wall2, cpu2 = _clock()
  return wall1 - wall0, (wall2 - wall1) / count, (cpu2 - cpu1) / count


def _round_flops(config, parts, train_ds) -> float | None:
  """XLA FLOPs of a round: one local step x local steps x cohort."""
  local = training.local_config(config, parts.trainable)
  optimizer = optax.sgd(config.client_learning_rate,
                        momentum=config.get('client_momentum', 0.0) or None)
  step = hardware.train_step_flops(
      train.classification_loss(parts.model), parts.state.params,
      parts.state.model_state,
      (local.batch_size,) + tuple(train_ds.x.shape[1:]), optimizer,
      parts.trainable)
  return hardware.scaled(step, local.scan_length(
      config.max_examples_per_client), config.cohort_size)


def time_federated(config, rounds: int, datasets) -> dict[str, float]:
  """Seconds per round (host gather + one jitted round), after 2 warm-ups."""
  train_ds, _, pool = experiment.load_clients(config, datasets)
  parts = experiment.build_parts(config, train_ds, pool, {})
  flops = _round_flops(config, parts, train_ds)
  step = federated_loop.make_round_step(parts.algorithm, train_ds, pool,
                                        config, parts.round_key)
  state = parts.state

  def one_round(state, r):
    state, metrics = step(state, r)
    jax.block_until_ready((state, metrics))
    return state

  warmup_wall, wall, cpu = _time_loop(one_round, state, rounds)
  examples = (config.cohort_size * config.local.num_steps *
              config.local.batch_size)
  return {'warmup_wall_s': warmup_wall, 'round_wall_s': wall,
          'round_cpu_s': cpu, 'examples_per_round': examples,
          'round_flops': flops}


def time_central(config, steps: int, datasets) -> dict[str, float]:
  """Seconds per centralised train step of `config`, after 2 warm-ups."""
  train_ds, _ = datasets
  model = models.build_model(
      config.model, train_ds.num_classes, norm=config.norm,
      **{k: tuple(v) if isinstance(v, list) else v
         for k, v in config.model_kwargs.items()})
  optimizer = optim.build_optimizer(config)
  state = train.init_state(model, optimizer, train_ds.x[:1],
                           jax.random.key(config.seed))
  paths = train.resolve_trainable(state.params, None)
  loss_fn = train.classification_loss(model)
  flops = hardware.train_step_flops(
      loss_fn, state.params, state.model_state,
      (config.batch_size,) + tuple(train_ds.x.shape[1:]), optimizer, paths)
  step_fn = jax.jit(train.make_train_step(loss_fn, optimizer, paths),
                    donate_argnums=0)
  rng = np.random.default_rng(0)

  def one_step(state, s):
    idx = rng.choice(len(train_ds), config.batch_size, replace=False)
    batch = {'x': train_ds.x[idx], 'y': train_ds.y[idx],
             'mask': np.ones(len(idx), np.float32)}
    state, metrics = step_fn(state, batch, jax.random.key(s))
    jax.block_until_ready(metrics)
    return state

  _, wall, cpu = _time_loop(one_step, state, steps)
  return {'step_wall_s': wall, 'step_cpu_s': cpu,
          'examples_per_step': config.batch_size, 'step_flops': flops}


def timing_rows(timing: dict) -> list[dict]:
  """Markdown rows of one --mode=time JSON: the round and the step."""
  rows = []
  for name, unit in (('federated', 'round'), ('central', 'step')):
    part = timing[name]
    achieved = part.get('achieved', {})
    rows.append({'overrides': ' '.join(timing['overrides']) or '-',
                 'timed': f'{name} {unit}',
                 'wall s': part[f'{unit}_wall_s'],
                 'cpu s': part[f'{unit}_cpu_s'],
                 **hardware.table_columns(achieved)})
  return rows


def _timing_markdown(out: dict) -> str:
  peaks = hardware.peak_text(out['matmul_peak_start'],
                             out['matmul_peak_end'])
  return (f"# Federated round and centralised step time\n\n"
          f"Load average (1 min) {out['loadavg_1min_before']:.2f} before, "
          f"{out['loadavg_1min_after']:.2f} after. GFLOP: XLA's FLOPs of "
          f'one step (x local steps x cohort for a round). {peaks}'
          f"\n\n{metric_writer.markdown_table(timing_rows(out))}\n")


def run_timing() -> dict:
  variant = 'smoke' if _SMOKE.value else None
  fed_config = _apply_overrides(fed_kws.get_config(variant), _OVERRIDE.value)
  experiment.validate_config(fed_config)
  central_config = kws_central.get_config(variant)
  datasets = registry.load_dataset(fed_config.data)
  load1 = os.getloadavg()[0]
  peak_start = hardware.matmul_peak()
  fed = time_federated(fed_config, _ROUNDS.value, datasets)
  central = time_central(central_config, _STEPS.value, datasets)
  peak_end = hardware.matmul_peak()
  fed['achieved'] = hardware.timed(fed['round_flops'], fed['round_wall_s'],
                                   peak_start['gflops'])
  central['achieved'] = hardware.timed(
      central['step_flops'], central['step_wall_s'], peak_start['gflops'])
  out = {'overrides': list(_OVERRIDE.value), 'smoke': _SMOKE.value,
         'matmul_peak_start': peak_start, 'matmul_peak_end': peak_end,
         'federated': fed,
         'central': central, 'loadavg_1min_before': load1,
         'loadavg_1min_after': os.getloadavg()[0],
         'cpu_ratio_round_per_step': fed['round_cpu_s'] / central['step_cpu_s'],
         'wall_ratio_round_per_step': (fed['round_wall_s'] /
                                       central['step_wall_s']),
         'jax_devices': str(jax.devices())}
  print(json.dumps(out, indent=2))
  print(_timing_markdown(out))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(out, f, indent=2)
    with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
      f.write(_timing_markdown(out))
  return out


def rounds_to_target(records, target: float) -> int | None:
  """First evaluated round whose test accuracy is >= target, else None."""
  for rec in records:
    if rec.get('test_accuracy', -1.0) >= target:
      return int(rec['round'])
  return None


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def run_report() -> dict:
  central = _read_json(os.path.join(_CENTRAL.value, 'final_metrics.json'))
  central_acc = central['test_accuracy']
  target = central_acc - _MARGIN.value
  timing = [_read_json(path) for path in _TIMING.value]
  rows, curves = [], {}
  for item in _RUN.value:
    name, _, workdir = item.partition(':')
    records = metric_writer.read_metrics(os.path.join(workdir,
                                                      'metrics.jsonl'))
    final_path = os.path.join(workdir, 'final_metrics.json')
    finished = os.path.exists(final_path)
    evals = [r for r in records if 'test_accuracy' in r]
    reached = rounds_to_target(evals, target)
    curves[name] = [(r['round'], r['test_accuracy']) for r in evals]
    last = evals[-1] if evals else {}
    row = {'run': name, 'finished': finished,
           'rounds_run': int(records[-1]['round']) if records else 0,
           'rounds_to_target': reached,
           'last_eval_round': int(last.get('round', 0)),
           'last_test_accuracy': round(last.get('test_accuracy', 0.0), 4),
           'best_test_accuracy': round(max(
               [r['test_accuracy'] for r in evals] or [0.0]), 4),
           'final_test_accuracy': None, 'gap_to_central': None,
           'train_seconds_measured': None}
    if finished:
      final = _read_json(final_path)
      row.update(final_test_accuracy=round(final['test_accuracy'], 4),
                 gap_to_central=round(central_acc - final['test_accuracy'],
                                      4),
                 train_seconds_measured=round(final['train_seconds'], 1))
    rows.append(row)
  out = {'central_test_accuracy': central_acc,
         'central_train_seconds': central.get('train_seconds'),
         'target': target, 'margin': _MARGIN.value, 'runs': rows,
         'curves': curves, 'timing': timing}
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, 'results.json'), 'w') as f:
    json.dump(out, f, indent=2)
  with open(os.path.join(_OUT_DIR.value, 'results.md'), 'w') as f:
    f.write(f'Centralised (configs/kws_central.py): test accuracy '
            f'{central_acc:.4f}; target = {target:.4f}.\n\n')
    f.write(metric_writer.markdown_table(rows) + '\n')
    timed = [t for t in timing if 'achieved' in t.get('federated', {})]
    if timed:
      f.write('\nTiming (wall seconds; GFLOP/s against the matmul peak '
              'measured in each timing run):\n\n' +
              metric_writer.markdown_table(
                  [r for t in timed for r in timing_rows(t)]) + '\n')
  _plot(curves, central_acc, target,
        os.path.join(_OUT_DIR.value, 'accuracy_vs_round.png'))
  print(metric_writer.markdown_table(rows))
  return out


def _plot(curves, central_acc, target, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, points in curves.items():
    ax.plot([p[0] for p in points], [p[1] for p in points], 'o-', ms=3,
            label=name)
  ax.axhline(central_acc, color='k', ls='--', label='centralised')
  ax.axhline(target, color='r', ls=':', label='target (central - 3 pts)')
  ax.set_xlabel('round')
  ax.set_ylabel('test accuracy (held-out speakers)')
  ax.set_ylim(0, 1)
  ax.legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  jnp.zeros(())  # Initialise the backend before timing.
  if _MODE.value == 'time':
    run_timing()
  else:
    run_report()


if __name__ == '__main__':
  cli.run(main, FLAGS)
