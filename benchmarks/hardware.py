"""How far a timing is from the hardware: XLA FLOP counts and a matmul peak.

`matmul_peak(n)` times a jitted n x n float32 matmul on the default device
(best of several calls: the least disturbed one) and returns its GFLOP/s, the
reference every benchmark here puts next to its achieved rate.
`compiled_flops(fn, *args)` is XLA's cost analysis of `jax.jit(fn)` on
`args`. XLA counts the body of a loop (`lax.scan`, `while`) once, not once per
iteration, so callers count one step and multiply by the number of steps.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def compiled_flops(fn: Callable[..., Any], *args) -> float | None:
  """FLOPs of one call of `jax.jit(fn)(*args)` per XLA (None if unknown)."""
  try:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
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
