r"""Training memory, step time and upload bytes of sparse update schemes.

Compares full updates with bias-only (BitFit; TinyTL, Cai et al. 2020), the
last k layers, and a sparse scheme searched under a memory budget (Lin et
al. 2022, "On-Device Training Under 256KB Memory"), on DS-CNN-S as the KWS
configs build it (36 classes, 98 x 40 log-mel, 4x4 first stride; batch norm
folded into the convolutions, as on a device; with its convolutions as
ondevice.models computes them on CPU, and as lax's convolutions) and the
image CNN (28 x 28 x 1, 10 classes), at batch 1 and 16.

Memory of one jitted Adam step, excluding the frozen weights (which a
device holds for inference anyway):
  compiled  temp + output bytes of `jax.jit(step).lower(...).compile()
            .memory_analysis()`, minus the frozen weights the step returns.
  analytic  trainable weights + gradients + Adam state + stored activations
            (`ondevice.cost.analytic_training_memory`).
each with stock `jax.nn.relu` (XLA keeps a float32 per ReLU value for the
backward pass) and with 1-bit ReLU masks (`sparse_updates.compact_relu`).
Step time: median over repeats, full and bias-only interleaved within each
repeat so that load changes hit both alike, with XLA's FLOPs of the step
(`gflop`), achieved GFLOP/s at the median and its fraction of a 1024 x 1024
float32 matmul's GFLOP/s measured at the start and end of the same run
(`benchmarks.hardware`). Upload: trainable bytes a
federated client sends per round (`ondevice.cost.bytes_of_trainable`).

Goals (issue 5): bias-only at least 5x less training memory than full, and
at least 1.4x faster per step.

    python -m benchmarks.train_memory --out=results.json \
        [--contribution=/tmp/contribution_kws/contribution.json]

writes results.json and results.md. Besides full, bias-only and last-2, a
TTE-style preset (biases of the last 4 layers, half of the last hidden
layer's output channels) is measured, and with --contribution the schemes
that run searched under each budget (DS-CNN-S).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Any

from absl import flags
from absl import logging
import jax
import numpy as np
import optax

from benchmarks import cli
from benchmarks import hardware
from ondevice import cost
from ondevice import metric_writer
from ondevice import models
from ondevice import train
from sparse_updates import channel_masks
from sparse_updates import compact_relu
from sparse_updates import presets
from sparse_updates import rules
from sparse_updates import search

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'results.json', 'JSON path; the markdown '
                           'table goes next to it (.md).', flag_values=FLAGS)
_BATCHES = flags.DEFINE_list('batches', ['1', '16'], 'Batch sizes.',
                             flag_values=FLAGS)
_MODELS = flags.DEFINE_list('models', ['ds_cnn_s', 'ds_cnn_s_lax', 'cnn'],
                            'Models (see MODELS).', flag_values=FLAGS)
_TIMED = flags.DEFINE_list('timed', ['ds_cnn_s', 'ds_cnn_s_lax'],
                           'Models whose step time is measured.',
                           flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed repeats per scheme.',
                                flag_values=FLAGS)
_ITERS = flags.DEFINE_integer('iters', 3, 'Steps per timed repeat.',
                              flag_values=FLAGS)
_TIME_BATCH = flags.DEFINE_integer('time_batch', 16, 'Batch of the timing.',
                                   flag_values=FLAGS)
_CONTRIBUTION = flags.DEFINE_string(
    'contribution', '', 'contribution.json of experiments.'
    'contribution_analysis on DS-CNN-S, for the searched schemes.',
    flag_values=FLAGS)

# name -> (ondevice.models name, extra build arguments, input shape without
# batch, classes). DS-CNN-S is built as configs/kws_central.py and
# configs/contribution_kws.py build it (4x4 first stride: 25 x 10 x 64
# maps). 'ds_cnn_s' keeps ondevice.models' CPU forms of its convolutions
# (im2col for conv0, 9 shifted products for each depthwise one, fast on XLA's
# CPU backend); 'ds_cnn_s_lax' injects lax's convolution instead.
_KWS = {'first_stride': (4, 4)}
MODELS = {
    'ds_cnn_s': ('ds_cnn_s', _KWS, (98, 40), 36),
    'ds_cnn_s_lax': ('ds_cnn_s', dict(
        _KWS, conv_general_dilated=jax.lax.conv_general_dilated), (98, 40),
                     36),
    'cnn': ('cnn', {}, (28, 28, 1), 10),
}


def build(name: str):
  """(model, params, input shape, classes) of a MODELS entry."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; choose from {list(MODELS)}.')
  zoo_name, kwargs, shape, classes = MODELS[name]
  model = models.build_model(zoo_name, classes, norm='none', **kwargs)
  return model, _params(model, shape), shape, classes


def _params(model, shape):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((1,) + shape, np.float32))['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def schemes(name, model, params, shape) -> dict[str, Any]:
  """{label: rules} compared for one model."""
  order = presets.forward_order(model, {'params': params},
                                np.zeros((1,) + shape, np.float32))
  out = {'full': presets.get_rules('full'),
         'bias_only': presets.get_rules('bias_only'),
         'last_k (k=2)': presets.get_rules('last_k', params, k=2,
                                           layer_order=order)}
  out['tte (bias last 4, 1/2 of last kernel)'] = presets.get_rules(
      'tte', params, bias_k=4, weight_layers=(order[-2],),
      weight_fraction=0.5, layer_order=order)
  if name.startswith('ds_cnn_s') and _CONTRIBUTION.value:
    with open(_CONTRIBUTION.value) as f:
      found = json.load(f)
    units = {u.name: u for u in search.contribution_units(
        params, found.get('unit_weight_fraction', 1.0), layer_order=order)}
    for result in found['search']:
      label = (f'searched @ {result["budget_bytes"] // 1024} KB: '
               f'{", ".join(result["units"]) or "classifier only"}')
      out[label] = search.scheme_rules([units[n] for n in result['units']])
  return out


def _step(model, params, scheme, bits):
  paths = rules.trainable_paths(params, scheme)
  opt = optax.adam(1e-3)
  if rules.channel_fractions(params, scheme):
    opt = channel_masks.masked_optimizer(
        opt, channel_masks.update_masks(params, scheme))
  loss_fn = train.classification_loss(model)
  if bits == 1:
    loss_fn = compact_relu.with_compact_relu(loss_fn)
  state = train.state_from_params(params, {}, opt, paths)
  return train.make_train_step(loss_fn, opt, paths), state, paths


def _batch(shape, batch_size, classes):
  rng = np.random.default_rng(1)
  return {'x': rng.normal(size=(batch_size,) + shape).astype(np.float32),
          'y': rng.integers(0, classes, batch_size).astype(np.int32),
          'mask': np.ones(batch_size, np.float32)}


def measure_memory(name: str) -> list[dict[str, Any]]:
  model, params, shape, classes = build(name)
  rows = []
  for label, scheme in schemes(name, model, params, shape).items():
    for batch_size in (int(b) for b in _BATCHES.value):
      batch = _batch(shape, batch_size, classes)
      row = {'model': name, 'scheme': label, 'batch': batch_size}
      for bits, tag in ((32, 'stock'), (1, 'compact')):
        step, state, paths = _step(model, params, scheme, bits)
        c = cost.compiled_cost(step, state, batch, jax.random.key(0),
                               donate_argnums=(0,))
        m = cost.analytic_training_memory(model, params, paths,
                                          batch['x'].shape, 2,
                                          relu_mask_bits=bits)
        row[f'compiled_kb_{tag}'] = round(
            (c.temp_bytes + c.output_bytes - m.frozen_weights) / 1024)
        row[f'analytic_kb_{tag}'] = round(m.training / 1024)
        row[f'activations_kb_{tag}'] = round(m.activations / 1024)
        row[f'gflops_{tag}'] = round(c.flops / 1e9, 3)
      rows.append(row)
      logging.info('%s', row)
  return rows


def upload_rows(name: str) -> list[dict[str, Any]]:
  model, params, shape, _ = build(name)
  rows = []
  total = cost.bytes_of_tree(params)
  for label, scheme in schemes(name, model, params, shape).items():
    masks = None
    if rules.channel_fractions(params, scheme):
      masks = channel_masks.update_masks(params, scheme)
    sent = cost.bytes_of_trainable(params, rules.trainable_paths(
        params, scheme), masks)
    rows.append({'model': name, 'scheme': label,
                 'upload_kb': round(sent / 1024, 2),
                 'fraction_of_model': round(sent / total, 4)})
  return rows


def measure_time(name: str, peak_gflops: float) -> list[dict[str, Any]]:
  """Median step time of full and bias-only, interleaved per repeat."""
  model, params, shape, classes = build(name)
  batch = _batch(shape, _TIME_BATCH.value, classes)
  runs = {}
  for label in ('full', 'bias_only'):
    for bits, tag in ((32, 'stock'), (1, 'compact')):
      step, state, _ = _step(model, params, presets.get_rules(label), bits)
      step = jax.jit(step)
      state, _ = step(state, batch, jax.random.key(0))  # Compile, warm up.
      jax.block_until_ready(state)
      flops = hardware.compiled_flops(step, state, batch, jax.random.key(0))
      runs[label, tag] = [step, state, [], flops]
  for repeat in range(_REPEATS.value):
    for key, run in runs.items():
      step, state, times, _ = run
      start = time.perf_counter()
      for i in range(_ITERS.value):
        state, metrics = step(state, batch, jax.random.key(repeat * 100 + i))
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / _ITERS.value)
      run[1] = state
  rows = []
  for (label, tag), (_, _, times, flops) in runs.items():
    rows.append({'model': name, 'scheme': label, 'relu': tag,
                 'batch': _TIME_BATCH.value,
                 'median_ms': round(1e3 * statistics.median(times), 1),
                 'min_ms': round(1e3 * min(times), 1),
                 **hardware.timed(flops, statistics.median(times),
                                  peak_gflops)})
  return rows


def ratios(memory, timing) -> dict[str, float]:
  out = {}
  for name in {r['model'] for r in memory}:
    for batch_size in {r['batch'] for r in memory}:
      get = {r['scheme']: r for r in memory
             if r['model'] == name and r['batch'] == batch_size}
      full, bias = get['full'], get['bias_only']
      key = f'{name}_b{batch_size}'
      out[f'{key}_full_over_bias_compiled_stock'] = (
          full['compiled_kb_stock'] / bias['compiled_kb_stock'])
      out[f'{key}_full_over_bias_compiled_compact'] = (
          full['compiled_kb_compact'] / bias['compiled_kb_compact'])
      out[f'{key}_full_stock_over_bias_compact_compiled'] = (
          full['compiled_kb_stock'] / bias['compiled_kb_compact'])
      out[f'{key}_full_over_bias_analytic_compact'] = (
          full['analytic_kb_compact'] / bias['analytic_kb_compact'])
  for name in {r['model'] for r in timing}:
    get = {(r['scheme'], r['relu']): r['median_ms'] for r in timing
           if r['model'] == name}
    for tag in ('stock', 'compact'):
      out[f'{name}_time_full_over_bias_{tag}'] = (
          get['full', tag] / get['bias_only', tag])
  return {k: round(v, 2) for k, v in sorted(out.items())}


def main(argv):
  del argv
  memory = [row for name in _MODELS.value for row in measure_memory(name)]
  upload = [row for name in _MODELS.value if name != 'ds_cnn_s_lax'
            for row in upload_rows(name)]
  peak_start = hardware.matmul_peak()
  timing = [row for name in _TIMED.value
            for row in measure_time(name, peak_start['gflops'])]
  peak_end = hardware.matmul_peak()
  results = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
      'cpu_count': os.cpu_count(), 'platform': platform.platform(),
      'jax': jax.__version__, 'contribution': _CONTRIBUTION.value or None,
      'matmul_peak_start': peak_start, 'matmul_peak_end': peak_end,
      'memory': memory, 'timing': timing, 'upload': upload,
      'ratios': ratios(memory, timing)}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
  md = [f'# Training memory of sparse updates ({results["date"]}, '
        f'{results["device"]}, jax {results["jax"]})', '',
        'Memory in KB for one Adam step, excluding frozen weights; "stock": '
        'jax.nn.relu, "compact": 1-bit ReLU masks.', '',
        metric_writer.markdown_table(memory), '',
        f'## Step time (batch {_TIME_BATCH.value}, median of '
        f'{_REPEATS.value} x {_ITERS.value} steps)', '',
        "gflop: XLA's FLOPs of one step; gflops at the median time; "
        'fraction_of_peak of the matmul peak. '
        + hardware.peak_text(peak_start, peak_end), '',
        metric_writer.markdown_table(timing), '',
        '## Bytes a client sends per round', '',
        metric_writer.markdown_table(upload), '', '## Ratios', '',
        metric_writer.markdown_table(
            [{'ratio': k, 'value': v} for k, v in results['ratios'].items()]),
        '']
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write('\n'.join(md))
  print('\n'.join(md))


if __name__ == '__main__':
  cli.run(main, FLAGS)
