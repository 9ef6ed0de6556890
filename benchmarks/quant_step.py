r"""Step time of int8 fwd+bwd training against float32 and AQT.

One training step is ``jax.value_and_grad`` of the loss plus an SGD update,
jitted; we time it in steady state (after compilation and warm-up) and report
the median over repeats, interleaving the modes within each repeat so that a
change of machine load hits them all alike. Workloads:

* a 512x512 dense layer (with bias, MSE loss) at batch 256, for float32, each
  of our modes (``quantized_training.QUANT_NAMES``) and, if ``aqtp`` imports,
  AQT's ``fully_quantized(fwd_bits=8, bwd_bits=8)`` and ``config_v4()``;
* DS-CNN small (``ondevice.models.build_model('ds_cnn_s', 36, ...)``) at batch
  64 on [64, 98, 40] log-mel inputs, for float32 and each of our modes, when
  ``ondevice.models`` is importable. Our simulated-path modes run their
  convolutions through the fast CPU forms (``impl='cpu_friendly'``: depthwise
  convs as shifted sums of int8 codes, conv0 as an im2col matmul; the
  pointwise convs and the classifier are int8 dots either way); the rows
  ``<mode>[lax convs]`` time the same mode with ``lax`` convolutions (the
  reference, and what quantised DS-CNNs ran before), for the before/after.

Every row also reports XLA's FLOPs of the step (`benchmarks.hardware`,
read from the step's own compiled executable), achieved GFLOP/s at the
median time and its fraction of a 1024 x 1024 float32 matmul's GFLOP/s
measured at the start and end of the same run. Quantised steps count their
int8 dots and the quantisation's elementwise work as XLA does.

Goal (issue 4): ``int8_fwd_bwd_sr`` at most 1.5x float32 and at most 0.6x AQT
fully_quantized on the dense layer.

    python -m benchmarks.quant_step --out=results.json

writes results.json and results.md (a markdown table of times and ratios).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

from absl import flags
from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks import cli
from benchmarks import hardware
import quantized_training as qt

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'results.json', 'Where to write the JSON; '
                           'the markdown table goes next to it (.md).',
                           flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Timed repeats per mode.',
                                flag_values=FLAGS)
_ITERS = flags.DEFINE_integer('iters', 10, 'Steps per dense-layer repeat.',
                              flag_values=FLAGS)
_DSCNN_ITERS = flags.DEFINE_integer('dscnn_iters', 1,
                                    'Steps per DS-CNN repeat.',
                                    flag_values=FLAGS)
_DSCNN_REPEATS = flags.DEFINE_integer('dscnn_repeats', 3,
                                      'Timed repeats per DS-CNN mode.',
                                      flag_values=FLAGS)
# The integer path is left out by default: XLA:CPU compiles int8 convolutions
# (and their transposes) very slowly and runs them no faster than float.
_DSCNN_MODES = flags.DEFINE_list(
    'dscnn_modes', ['none', 'int8_fwd', 'int8_fwd_bwd', 'int8_fwd_bwd_sr',
                    'int8_fwd_bwd_fgrad'],
    'Quant modes timed on DS-CNN.', flag_values=FLAGS)
_DSCNN_LAX_MODES = flags.DEFINE_list(
    'dscnn_lax_modes', ['int8_fwd_bwd_sr'],
    'Quant modes also timed on DS-CNN with lax (reference) convolutions.',
    flag_values=FLAGS)
_SKIP_DSCNN = flags.DEFINE_bool('skip_dscnn', False, 'Only the dense layer.',
                                flag_values=FLAGS)

GOAL_MODE = 'int8_fwd_bwd_sr'
DENSE = (((1,), (0,)), ((), ()))
Step = Callable[..., Any]


def _dense_step(dot_general_for_key: Callable[[jax.Array], Callable]) -> Step:
  """SGD step of y = x W + b with MSE loss; the matmul is injected."""

  def loss_fn(params, x, target, key):
    w, b = params
    y = dot_general_for_key(key)(x, w, DENSE) + b
    return jnp.mean((y - target) ** 2)

  @jax.jit
  def step(params, x, target, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, target, key)
    params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
    return params, loss

  return step


def _ours(name: str) -> Callable[[jax.Array], Callable]:
  spec = qt.get_quant(name)
  if spec.config is None:
    return lambda key: lax.dot_general
  return lambda key: functools.partial(qt.int8_dot_general,
                                       config=spec.config, key=key)


def _aqt_modes() -> tuple[dict[str, Callable], str | None]:
  """AQT dot_generals keyed by row name, or ({}, why not)."""
  try:
    from aqt.jax.v2 import config as aqt_config  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return {}, f'aqtp does not import: {type(e).__name__}: {e}'
  configs = {
      'aqt_fully_quantized': aqt_config.fully_quantized(fwd_bits=8,
                                                        bwd_bits=8),
      'aqt_config_v4': aqt_config.config_v4(),
  }
  return {name: (lambda key, cfg=cfg: aqt_config.set_context(cfg, key, None))
          for name, cfg in configs.items()}, None


def _time_interleaved(runs: dict[str, Callable[[], Any]], repeats: int,
                      iters: int) -> dict[str, dict[str, float]]:
  """Median / min seconds per step of each run, modes interleaved."""
  first_call = {}
  for name, run in runs.items():  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(run())
    first_call[name] = time.perf_counter() - start
    jax.block_until_ready(run())
    logging.info('%s: first call (compile) %.1f s', name, first_call[name])
  # Each run is a partial of a jitted step: its executable is cached now.
  flops = {name: hardware.compiled_flops(run.func, *run.args)
           for name, run in runs.items()}
  samples = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      for _ in range(iters):
        out = run()
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / iters)
  return {name: {'median_ms': 1e3 * statistics.median(s),
                 'min_ms': 1e3 * min(s), 'repeats': repeats, 'iters': iters,
                 'first_call_s': first_call[name],
                 'step_flops': flops[name]}
          for name, s in samples.items()}


def bench_dense(repeats: int, iters: int) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 512)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(256, 512)), jnp.float32)
  params = (jnp.asarray(rng.normal(size=(512, 512)) / np.sqrt(512),
                        jnp.float32), jnp.zeros((512,), jnp.float32))
  key = jax.random.key(0)
  dot_generals = {('float32' if n == 'none' else n): _ours(n)
                  for n in qt.QUANT_NAMES}
  aqt, aqt_error = _aqt_modes()
  dot_generals.update(aqt)
  runs = {}
  for name, dg in dot_generals.items():
    step = _dense_step(dg)
    runs[name] = functools.partial(step, params, x, target, key)
  return {'workload': 'dense 512x512, batch 256, MSE, SGD',
          'times': _time_interleaved(runs, repeats, iters),
          'aqt_error': aqt_error}


def _dscnn_model_kwargs(name: str, lax_convs: bool) -> dict[str, Any]:
  spec = qt.get_quant(name)
  kwargs = spec.model_kwargs()
  if lax_convs and spec.config is not None:
    kwargs['conv_general_dilated_cls'] = functools.partial(
        qt.Int8ConvGeneralDilated, config=spec.config, impl='lax')
  return kwargs


def bench_dscnn(modes: list[str], repeats: int, iters: int,
                lax_modes: tuple[str, ...] = ()) -> dict[str, Any]:
  try:
    from ondevice import models  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return {'skipped': f'ondevice.models does not import: {e}'}
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 98, 40)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 36, size=64))
  runs = {}
  rows = [(n, False) for n in modes] + [(n, True) for n in lax_modes]
  for name, lax_convs in rows:
    model = models.build_model('ds_cnn_s', 36,
                               **_dscnn_model_kwargs(name, lax_convs))
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), x[:1])
    params = variables['params']
    others = {k: v for k, v in variables.items() if k != 'params'}

    def loss_fn(params, others, x, y, key, model=model):
      if others:  # batch norm: update its statistics as training does
        logits, updated = model.apply({'params': params, **others}, x,
                                      train=True, mutable=list(others),
                                      rngs={'quant': key})
      else:
        logits, updated = model.apply({'params': params}, x, train=True,
                                      rngs={'quant': key}), {}
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), updated

    @jax.jit
    def step(params, others, x, y, key, loss_fn=loss_fn):
      (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, others, x, y, key)
      params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
      return params, updated, loss

    row = 'float32' if name == 'none' else name
    row += ' [lax convs]' if lax_convs else ''
    runs[row] = functools.partial(step, params, others, x, y,
                                  jax.random.key(1))
  return {'workload': 'DS-CNN small, batch 64, [64, 98, 40], CE, SGD',
          'times': _time_interleaved(runs, repeats, iters)}


def _ratios(times: dict[str, Any], ref: str,
            stat: str = 'median_ms') -> dict[str, float]:
  if ref not in times:
    return {}
  base = times[ref][stat]
  return {name: t[stat] / base for name, t in times.items()}


def _add_achieved(results: dict[str, Any]) -> None:
  """Each timed row's GFLOP, GFLOP/s and fraction of the start's peak."""
  peak = results['matmul_peak_start']['gflops']
  for key in ('dense', 'dscnn'):
    for t in results.get(key, {}).get('times', {}).values():
      t['achieved'] = hardware.timed(t['step_flops'], t['median_ms'] / 1e3,
                                     peak)


def _achieved_cells(t: dict[str, Any]) -> str:
  return ' | '.join(str(v) for v in
                    hardware.table_columns(t.get('achieved', {})).values())


def _markdown(results: dict[str, Any]) -> str:
  peaks = hardware.peak_text(results.get('matmul_peak_start'),
                             results.get('matmul_peak_end'))
  lines = [f"# int8 training step time ({results['device']})", '',
           f"jax {results['jax']}, {results['cpu_count']} CPU cores, load "
           f"average at start {results['loadavg']}, {results['date']}.", '',
           "GFLOP: XLA's FLOPs of one step; GFLOP/s at the median time. "
           + peaks, '',
           'ms per step (value_and_grad + SGD, jitted, steady state); '
           'modes interleaved within each repeat. On a shared, loaded '
           'machine the min is the better estimate of the uncontended cost.',
           '']
  for key in ('dense', 'dscnn'):
    bench = results.get(key, {})
    if 'times' not in bench:
      lines += [f"## {key}: skipped ({bench.get('skipped', 'n/a')})", '']
      continue
    times = bench['times']
    vs_float = _ratios(times, 'float32')
    vs_float_min = _ratios(times, 'float32', 'min_ms')
    vs_aqt = _ratios(times, 'aqt_fully_quantized')
    vs_aqt_min = _ratios(times, 'aqt_fully_quantized', 'min_ms')
    lines += [f"## {bench['workload']}", '',
              '| mode | median ms | min ms | vs float32 (median / min) | '
              'vs AQT fq (median / min) | GFLOP | GFLOP/s | % of peak |',
              '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for name, t in times.items():
      aqt = (f'{vs_aqt[name]:.2f}x / {vs_aqt_min[name]:.2f}x' if vs_aqt
             else '-')
      lines.append(f"| {name} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | "
                   f'{vs_float[name]:.2f}x / {vs_float_min[name]:.2f}x | '
                   f'{aqt} | {_achieved_cells(t)} |')
    if bench.get('aqt_error'):
      lines.append(f"\nAQT rows skipped: {bench['aqt_error']}")
    if key == 'dscnn':
      lines.append(
          '\nOur simulated-path modes run DS-CNN convolutions through the '
          'fast CPU forms (depthwise: 9 shifted elementwise multiply-adds '
          'of int8 codes; conv0: im2col matmul of codes; pointwise and '
          'classifier: int8 dots), like the float32 model. '
          '"[lax convs]" is the same mode with lax convolutions, i.e. '
          'before the fast forms.')
    lines.append('')
  goal = results['goal']
  lines += ['## Goal', '', goal['text'], '',
            f"- vs float32: {goal['vs_float32']:.2f}x "
            f"({'met' if goal['met_float'] else 'NOT met'})",
            f"- vs AQT fully_quantized: "
            + (f"{goal['vs_aqt']:.2f}x "
               f"({'met' if goal['met_aqt'] else 'NOT met'})"
               if goal['vs_aqt'] is not None else 'n/a (no AQT)'), '']
  return '\n'.join(lines)


def main(argv):
  del argv
  results = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'device': f'{platform.processor() or platform.machine()} CPU '
                f'({jax.devices()[0].platform})',
      'jax': jax.__version__,
      'cpu_count': os.cpu_count(),
      'loadavg': [round(v, 2) for v in os.getloadavg()],
      'matmul_peak_start': hardware.matmul_peak(),
      'dense': bench_dense(_REPEATS.value, _ITERS.value),
  }
  try:
    import aqt  # pylint: disable=g-import-not-at-top,unused-import
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    results['aqtp'] = metadata.version('aqtp')
  except Exception:  # pylint: disable=broad-except
    results['aqtp'] = None
  if not _SKIP_DSCNN.value:
    results['dscnn'] = bench_dscnn(_DSCNN_MODES.value, _DSCNN_REPEATS.value,
                                   _DSCNN_ITERS.value,
                                   tuple(_DSCNN_LAX_MODES.value))
  results['matmul_peak_end'] = hardware.matmul_peak()
  _add_achieved(results)
  times = results['dense']['times']
  vs_float = _ratios(times, 'float32')[GOAL_MODE]
  vs_aqt = _ratios(times, 'aqt_fully_quantized').get(GOAL_MODE)
  results['goal'] = {
      'text': f'{GOAL_MODE} on the dense layer: <= 1.5x float32 and <= 0.6x '
              'AQT fully_quantized(fwd_bits=8, bwd_bits=8).',
      'vs_float32': vs_float, 'met_float': vs_float <= 1.5,
      'vs_aqt': vs_aqt, 'met_aqt': None if vs_aqt is None else vs_aqt <= 0.6}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
  md_path = os.path.splitext(_OUT.value)[0] + '.md'
  with open(md_path, 'w') as f:
    f.write(_markdown(results))
  print(_markdown(results))


if __name__ == '__main__':
  cli.run(main, FLAGS)
