r"""Test accuracy of int8 fwd+bwd training against float32, and int8 uploads.

Issue 4's accuracy goal: KWS (DS-CNN) and Fashion-MNIST trained with int8
forward and backward matmuls (``int8_fwd_bwd_sr``: int8 operands in all three
matmuls of every layer, stochastic rounding of the gradients) end within one
point of float32 test accuracy, centralised and federated. Each pair of runs
uses identical settings (the config file plus the overrides in ``RUNS``) and
differs only in ``config.quant``. The communication rows rerun federated
Fashion-MNIST with int8-quantised client deltas
(``fedjax_ext.compression.stochastic_quantize(8)``) and report the bytes each
client uploads per round against float32.

The runs are shortened (fewer steps / rounds than the configs' defaults) so
that they finish on a shared 2-core CPU; the float32 and int8 runs of a pair
are always shortened alike. Run each one in its own process, then collect:

    python -m benchmarks.quant_accuracy --run=fmnist_central:none \
        --workdir=/tmp/quant_acc
    ...  # one --run per row of RUNS x its modes (see --list)
    python -m benchmarks.quant_accuracy --workdir=/tmp/quant_acc \
        --out=benchmarks/results/quant_accuracy/results.json

The collect step (no --run) reads each run's final_metrics.json and
config.json and writes results.json plus results.md next to it.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from benchmarks import cli
import quantized_training

FLAGS = flags.FlagValues()
_RUN = flags.DEFINE_string(
    'run', None, 'One run "<name>:<variant>" to train, e.g. '
    'fed_kws:int8_fwd_bwd_sr; without it, collect the finished runs.',
    flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/quant_accuracy',
                               'Parent directory of the runs\' workdirs.',
                               flag_values=FLAGS)
_OUT = flags.DEFINE_string(
    'out', 'benchmarks/results/quant_accuracy/results.json',
    'Where the collect step writes JSON (markdown goes next to it).',
    flag_values=FLAGS)
_LIST = flags.DEFINE_bool('list', False, 'Print the runs and exit.',
                          flag_values=FLAGS)

INT8_MODE = 'int8_fwd_bwd_sr'
# Variant name -> config overrides on top of the run's own.
VARIANTS = {
    'none': {'quant': 'none'},
    INT8_MODE: {'quant': INT8_MODE},
    'none+int8_upload': {'quant': 'none', 'compression.name': 'quantize',
                         'compression.quantize.bits': 8},
  }
ACCURACY_VARIANTS = ('none', INT8_MODE)

# name -> (binary kind, config file, shortened settings, variants).
RUNS: dict[str, tuple[str, str, dict[str, Any], tuple[str, ...]]] = {
    'fmnist_central': (
        'central', 'configs/fmnist_central.py',
        {'num_steps': 200, 'eval_every': 100, 'log_every': 50,
         'checkpoint_every': 200},
        ACCURACY_VARIANTS),
    'kws_central': (
        'central', 'configs/kws_central.py',
        {'num_steps': 300, 'warmup_steps': 30, 'eval_every': 150,
         'log_every': 50, 'checkpoint_every': 300},
        ACCURACY_VARIANTS),
    'fed_fmnist': (
        'federated', 'configs/fed_fmnist.py',
        {'num_rounds': 10, 'cohort_size': 10, 'eval_every': 5,
         'checkpoint_every': 10},
        ACCURACY_VARIANTS + ('none+int8_upload',)),
    # FedAdam as in the config's docstring: plain FedAvg barely moves DS-CNN
    # in a few dozen rounds.
    'fed_kws': (
        'federated', 'configs/fed_kws.py',
        {'num_rounds': 20, 'cohort_size': 10, 'algorithm.name': 'fedadam',
         'server_learning_rate': 1e-2, 'eval_every': 10,
         'checkpoint_every': 20},
        ACCURACY_VARIANTS),
}


def _load_config(path: str) -> ml_collections.ConfigDict:
  module_name = os.path.splitext(os.path.basename(path))[0]
  module = __import__(f'configs.{module_name}', fromlist=['get_config'])
  return module.get_config()


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    # Only compression knobs may be new (e.g. compression.bits).
    if parents != ['compression']:
      raise ValueError(f'Config has no key {dotted!r}; fix RUNS/VARIANTS.')
  node[leaf] = value


def build_config(name: str, variant: str) -> ml_collections.ConfigDict:
  """The config of one run: file defaults, RUNS overrides, variant."""
  if name not in RUNS:
    raise ValueError(f'Unknown run {name!r}; choose one of {sorted(RUNS)}.')
  _, path, overrides, variants = RUNS[name]
  if variant not in variants:
    raise ValueError(f'Run {name!r} has variants {variants}, not '
                     f'{variant!r}.')
  config = _load_config(path)
  for key, value in {**overrides, **VARIANTS[variant]}.items():
    _set(config, key, value)
  return config


def run_dir(name: str, variant: str) -> str:
  return os.path.join(_WORKDIR.value, f'{name}__{variant.replace("+", "_")}')


def train_one(name: str, variant: str) -> None:
  """Trains one run in this process; writes config.json to its workdir."""
  # Imported here: the collect step needs neither.
  from fedjax_ext import training  # pylint: disable=g-import-not-at-top
  from central import supervised  # pylint: disable=g-import-not-at-top
  config = build_config(name, variant)
  workdir = run_dir(name, variant)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  quant = quantized_training.get_quant(config.quant)
  kind = RUNS[name][0]
  train_fn = (supervised.train_and_evaluate if kind == 'central' else
              training.train_and_evaluate)
  train_fn(config, workdir, model_kwargs=quant.model_kwargs())


def _without(config: dict[str, Any], keys=('quant', 'compression')):
  return {k: v for k, v in config.items() if k not in keys}


def _evals(workdir: str) -> dict[int, float]:
  """Test accuracy by step (or round) from a run's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {int(r['step']): r['test_accuracy'] for r in records
          if 'test_accuracy' in r}


def collect() -> dict[str, Any]:
  """Reads the runs; pairs each with its float32 run at the same step.

  A finished run reports its final test accuracy. A run still going (or cut
  off) reports its latest evaluation, marked unfinished, and is compared
  with the float32 run's evaluation at that same step.
  """
  rows, missing = [], []
  for name, (kind, path, overrides, variants) in RUNS.items():
    configs, finals, evals = {}, {}, {}
    for variant in variants:
      d = run_dir(name, variant)
      evals[variant] = _evals(d)
      try:
        with open(os.path.join(d, 'config.json')) as f:
          configs[variant] = json.load(f)
      except FileNotFoundError:
        missing.append(f'{name}:{variant} (not started, {d})')
        continue
      try:
        with open(os.path.join(d, 'final_metrics.json')) as f:
          finals[variant] = json.load(f)
      except FileNotFoundError:
        if not evals[variant]:
          missing.append(f'{name}:{variant} (no evaluation yet, {d})')
    total = overrides.get('num_steps', overrides.get('num_rounds'))
    for variant in variants:
      if variant not in configs or not (variant in finals or
                                        evals[variant]):
        continue
      final = finals.get(variant)
      step = total if final else max(evals[variant])
      acc = final['test_accuracy'] if final else evals[variant][step]
      base = None
      if 'none' in finals and final:
        base = finals['none']['test_accuracy']
      elif step in evals.get('none', {}):
        base = evals['none'][step]
      same = (_without(configs[variant]) == _without(configs['none'])
              if 'none' in configs else None)
      row = {'run': name, 'kind': kind, 'config': path,
             'overrides': overrides, 'variant': variant,
             'quant': configs[variant]['quant'],
             'compression': configs[variant].get('compression',
                                                  {}).get('name', '-'),
             'finished': final is not None, 'at_step': step,
             'total_steps': total, 'test_accuracy': acc,
             'test_accuracy_by_step': evals[variant],
             'delta_vs_float32_points': (
                 None if base is None else 100 * (acc - base)),
             'same_settings_as_float32': same,
             'train_seconds': final.get('train_seconds') if final else None}
      if kind == 'federated':
        row['bytes_per_client'] = _bytes_sent(run_dir(name, variant))
      rows.append(row)
  uploads = [upload_bytes(name) for name, run in RUNS.items()
             if run[0] == 'federated']
  return {'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'int8_mode': INT8_MODE, 'rows': rows, 'missing': missing,
          'upload_bytes': uploads,
          'goal': 'int8 fwd+bwd within 1 point of float32 test accuracy, '
                  'centralised and federated.'}


# Dataset name -> (example input shape, number of classes), for the exact
# upload sizes, which depend only on the parameter shapes.
_DATA_SHAPES = {'fashion_mnist': ((1, 28, 28, 1), 10),
                'speech_keywords': ((1, 98, 40), 36)}


def upload_bytes(name: str) -> dict[str, Any]:
  """Bytes one client uploads per round: float32 vs int8 deltas.

  Exact from the parameter shapes (full-model training): float32 is 4 bytes
  per parameter, int8 one byte per parameter plus one float32 scale per
  tensor (``fedjax_ext.compression.quantized_bytes``).
  """
  # Imported here: only the collect step needs them.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_ext import compression  # pylint: disable=g-import-not-at-top
  from ondevice import models  # pylint: disable=g-import-not-at-top
  config = build_config(name, 'none')
  shape, classes = _DATA_SHAPES[config.data.name]
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.get('model_kwargs', {}).items()}
  model = models.build_model(config.model, classes, norm=config.norm,
                             **kwargs)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros(shape))['params']
  f32 = compression.bytes_of(params)
  int8 = compression.quantized_bytes(params, 8)
  return {'run': name, 'model': config.model,
          'num_params': f32 // 4, 'num_tensors': len(jax.tree.leaves(params)),
          'bytes_float32': f32, 'bytes_int8': int8, 'ratio': int8 / f32}


def _bytes_sent(workdir: str) -> float | None:
  """Bytes each client uploaded in the latest logged round."""
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  sent = [r['bytes_per_client'] for r in records if 'bytes_per_client' in r]
  return sent[-1] if sent else None


def markdown(results: dict[str, Any]) -> str:
  lines = ['# int8 fwd+bwd training: test accuracy vs float32', '',
           f"{results['date']}. int8 mode `{results['int8_mode']}` (int8 "
           'operands in the forward, input-gradient and weight-gradient '
           'matmuls of every conv / dense layer, stochastically rounded '
           'gradients). Goal: ' + results['goal'], '',
           'Shortened runs (same settings for float32 and int8; overrides '
           'below), one seed each, on a shared CPU.', '',
           'Unfinished runs (cut off at the deadline) show their latest '
           'evaluation and are compared with float32 at the same step.', '',
           '| run | variant | step | test accuracy | vs float32 (points) | '
           'within 1 point | overrides |',
           '| --- | --- | --- | ---: | ---: | --- | --- |']
  for r in results['rows']:
    if '+' in r['variant']:
      continue
    delta = r['delta_vs_float32_points']
    within = '-' if r['variant'] == 'none' or delta is None else (
        'yes' if abs(delta) <= 1.0 else 'NO')
    step = f"{r['at_step']}/{r['total_steps']}" + (
        '' if r['finished'] else ' (unfinished)')
    lines.append(
        f"| {r['run']} | {r['variant']} | {step} | "
        f"{100 * r['test_accuracy']:.2f}% | "
        f"{'-' if delta is None else f'{delta:+.2f}'} | {within} | "
        f"{_fmt_overrides(r['overrides'])} |")
  lines += ['', '## Upload per client per round', '',
            'Client deltas sent as float32 or as int8 codes with one '
            'float32 scale per parameter tensor '
            '(`compression.name=quantize, bits=8`, unbiased stochastic '
            'rounding; `fedjax_ext.compression`). Exact sizes from the '
            'parameter shapes:', '',
            '| run | model | params | tensors | float32 bytes | int8 bytes | '
            'int8 / float32 |', '| --- | --- | ---: | ---: | ---: | ---: | '
            '---: |']
  for u in results['upload_bytes']:
    lines.append(f"| {u['run']} | {u['model']} | {u['num_params']} | "
                 f"{u['num_tensors']} | {u['bytes_float32']} | "
                 f"{u['bytes_int8']} | {u['ratio']:.3f}x |")
  comm = [r for r in results['rows'] if r['kind'] == 'federated']
  if comm:
    lines += ['', 'Measured in the federated runs (bytes_sent reported by '
              'the round, last round):', '',
              '| run | variant | bytes / client / round | vs float32 | '
              'test accuracy |', '| --- | --- | ---: | ---: | ---: |']
    f32 = {u['run']: u['bytes_float32'] for u in results['upload_bytes']}
    for r in comm:
      ratio = r['bytes_per_client'] / f32[r['run']]
      lines.append(f"| {r['run']} | {r['variant']} | "
                   f"{r['bytes_per_client']:.0f} | {ratio:.3f}x | "
                   f"{100 * r['test_accuracy']:.2f}% (step "
                   f"{r['at_step']}) |")
  if results['missing']:
    lines += ['', 'Not finished when collected: ' +
              ', '.join(results['missing'])]
  return '\n'.join(lines) + '\n'


def _fmt_overrides(overrides: dict[str, Any]) -> str:
  return ', '.join(f'{k}={v}' for k, v in overrides.items())


def main(argv):
  del argv
  if _LIST.value:
    for name, (_, _, _, variants) in RUNS.items():
      for variant in variants:
        print(f'{name}:{variant}')
    return
  if _RUN.value:
    name, _, variant = _RUN.value.partition(':')
    train_one(name, variant)
    return
  results = collect()
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
  md = markdown(results)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(md)
  logging.info('Wrote %s', _OUT.value)
  print(md)


if __name__ == '__main__':
  cli.run(main, FLAGS)
