"""How far a timing is from the hardware: XLA FLOP counts and a matmul peak.

`matmul_peak(n)` times a jitted n x n float32 matmul on the default device
(best of several calls: the least disturbed one) and returns its GFLOP/s, the
reference every benchmark here puts next to its achieved rate.
`compiled_flops(fn, *args)` is XLA's cost analysis of `jax.jit(fn)` on
`args`. XLA counts the body of a loop (`lax.scan`, `while`) once, not once per
iteration, so callers count one step and multiply by the number of steps
(`scaled`); `train_step_flops` counts one local training step.
`timed`, `table_columns` and `peak_text` are the JSON columns, markdown
columns and markdown sentence every timed row of a benchmark reports.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from ondevice import train


def compiled_flops(fn: Callable[..., Any], *args) -> float | None:
  """FLOPs of one call of `jax.jit(fn)(*args)` per XLA (None if unknown).

  An already jitted `fn` is lowered as it is, so its executable comes from
  (or goes to) the same cache as its calls: no second compilation.
  """
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Backends without a cost model.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def matmul_peak(n: int = 1024, repeats: int = 20) -> dict[str, float]:
  """GFLOP/s of an n x n float32 matmul (best of `repeats` timed calls)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return {'n': n, 'seconds': best, 'gflops': 2.0 * n ** 3 / best / 1e9,
          'device': str(jax.devices()[0].device_kind)}


def achieved(flops: float | None, seconds: float,
             peak_gflops: float) -> dict[str, float | None]:
  """{'gflops', 'fraction_of_peak'} of `flops` done in `seconds`."""
  if flops is None or seconds <= 0:
    return {'gflops': None, 'fraction_of_peak': None}
  gflops = flops / seconds / 1e9
  return {'gflops': gflops, 'fraction_of_peak': gflops / peak_gflops}


def train_step_flops(loss_fn: Callable[..., Any], params: Any,
                     model_state: Any, batch_shape: Sequence[int],
                     optimizer: optax.GradientTransformation,
                     trainable: Sequence[str] | None = None) -> float | None:
  """XLA's FLOPs of one `train.make_train_step` step on a batch of zeros.

  Args:
    loss_fn: a `train.LossFn` (e.g. `train.classification_loss(model)`).
    params: the model's params.
    model_state: its other collections (batch statistics), or {}.
    batch_shape: shape of the batch's inputs `x`, batch axis first.
    optimizer: the local optimiser (its update is counted too).
    trainable: paths of the trainable leaves, or None for all.
  """
  state = train.state_from_params(params, model_state, optimizer, trainable)
  step = train.make_train_step(loss_fn, optimizer,
                               train.resolve_trainable(params, trainable))
  size = batch_shape[0]
  batch = {'x': jnp.zeros(tuple(batch_shape), jnp.float32),
           'y': jnp.zeros((size,), jnp.int32),
           'mask': jnp.ones((size,), jnp.float32)}
  return compiled_flops(step, state, batch, jax.random.key(0))


def scaled(flops: float | None, *counts: int) -> float | None:
  """`flops` x every count (one step x steps x clients), None stays None.

  XLA counts a loop body once, so the FLOPs of a round whose clients run
  their local steps in a loop are one step's times the loop's trips.
  """
  if flops is None:
    return None
  for count in counts:
    flops *= count
  return float(flops)


def timed(flops: float | None, seconds: float,
          peak_gflops: float) -> dict[str, float | None]:
  """The JSON columns of one timed row: {'gflop', 'gflops',
  'fraction_of_peak'} of `flops` done in `seconds` against a matmul peak."""
  return {'gflop': None if flops is None else flops / 1e9,
          **achieved(flops, seconds, peak_gflops)}


def table_columns(row: dict[str, Any]) -> dict[str, Any]:
  """Markdown columns of a `timed` dict: GFLOP done, GFLOP/s and % of the
  matmul peak ('-' where unknown)."""
  gflop, gflops = row.get('gflop'), row.get('gflops')
  fraction = row.get('fraction_of_peak')
  return {'GFLOP': '-' if gflop is None else float(f'{gflop:.4g}'),
          'GFLOP/s': '-' if gflops is None else round(gflops, 2),
          '% of peak': '-' if fraction is None else round(100 * fraction, 1)}


def peak_text(start: dict[str, Any] | None, end: dict[str, Any] | None) -> str:
  """One sentence naming the matmul peaks measured at a run's start and end."""
  found = [p for p in (start, end) if p]
  if not found:
    return 'Matmul peak: not measured.'
  rates = ' / '.join(f"{p['gflops']:.1f}" for p in found)
  return (f"Matmul peak {rates} GFLOP/s ({found[0]['n']} x {found[0]['n']} "
          f"float32 on {found[0]['device']}; "
          f"{'start / end' if len(found) == 2 else 'one measure'} of the run; "
          'the fraction of peak is against the start).')
