"""Update compression applied per client before aggregation, with byte counts.

A per-client transform has the shape

    transform(delta, key) -> (delta, info)

and runs inside `jax.vmap` over the cohort. Compression transforms return the
*decoded* update (what the server reconstructs), so aggregation code never needs
to know the wire format, and report `info['bytes_sent']`, the int32 size of the
encoded payload for that client in this round. Byte counts depend only on leaf
shapes, so they are exact and identical for every client.

Methods:
  * `stochastic_quantize`: unbiased stochastic uniform quantisation with one
    scale per leaf, as in QSGD (Alistarh et al. 2017, "QSGD:
    Communication-Efficient SGD via Gradient Quantization and Encoding") and
    the federated variant of Konecny et al. 2016, "Federated Learning:
    Strategies for Improving Communication Efficiency".
  * `top_k`: magnitude sparsification per leaf (Aji & Heafield 2017, "Sparse
    Communication for Distributed Gradient Descent"; Lin et al. 2018, "Deep
    Gradient Compression"), sent as values plus int32 indices.
  * `identity`: the uncompressed baseline.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
Info = dict[str, jax.Array]
Transform = Callable[[PyTree, jax.Array], tuple[PyTree, Info]]

_SCALE_BYTES = 4  # One float32 scale per quantised leaf.
_INDEX_BYTES = 4  # int32 coordinate index per kept top-k value.


def bytes_of(tree: PyTree) -> int:
  """Bytes needed to send `tree` uncompressed in its own dtypes."""
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def _bytes_info(num_bytes: int) -> Info:
  return {'bytes_sent': jnp.asarray(num_bytes, jnp.int32)}


def identity() -> Transform:
  """Sends the update as it is; bytes = size * itemsize (4 per float32)."""

  def transform(delta, key):
    del key  # Deterministic.
    return delta, _bytes_info(bytes_of(delta))

  return transform


def quantized_bytes(tree: PyTree, bits: int) -> int:
  """Bytes of `tree` at `bits` per entry plus one float32 scale per leaf."""
  return int(sum(math.ceil(math.prod(x.shape) * bits / 8) + _SCALE_BYTES
                 for x in jax.tree_util.tree_leaves(tree)))


def _quantize_leaf(x: jax.Array, key: jax.Array, levels: int) -> jax.Array:
  xf = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(xf))
  safe = jnp.where(scale > 0, scale, 1.0)
  y = xf / safe * levels  # In [-levels, levels].
  low = jnp.floor(y)
  # Rounding up with probability equal to the fractional part makes E[q] = y.
  up = jax.random.uniform(key, x.shape) < (y - low)
  q = jnp.clip(low + up, -levels, levels)
  return (q * (safe / levels)).astype(x.dtype)


def stochastic_quantize(bits: int = 8) -> Transform:
  """Unbiased stochastic uniform quantisation, one scale s = max|x| per leaf.

  Each entry is mapped to one of the 2L + 1 levels {-L..L} * s / L, with
  L = 2^(bits-1) - 1 (so int8 uses -127..127), rounding up or down at random
  with the probability that makes the decoded value unbiased. The decoding
  error per entry is below s / L and its variance at most (s / L)^2 / 4.

  Args:
    bits: bits per entry on the wire, in [2, 16].

  Returns:
    A transform whose info holds 'bytes_sent' = sum over leaves of
    ceil(size * bits / 8) + 4 (the float32 scale).
  """
  if int(bits) != bits or not 2 <= bits <= 16:
    raise ValueError(f'stochastic_quantize(bits={bits}): bits must be an '
                     'integer in [2, 16] (8 gives int8).')
  bits = int(bits)
  levels = 2 ** (bits - 1) - 1

  def transform(delta, key):
    leaves, treedef = jax.tree_util.tree_flatten(delta)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [_quantize_leaf(x, k, levels) for x, k in zip(leaves, keys)]
    return (jax.tree_util.tree_unflatten(treedef, out),
            _bytes_info(quantized_bytes(delta, bits)))

  return transform


def top_k_count(size: int, fraction: float) -> int:
  """Entries kept from a leaf of `size`: round(fraction * size), at least 1."""
  return min(size, max(1, int(math.floor(fraction * size + 0.5))))


def top_k(fraction: float) -> Transform:
  """Keeps the k largest-magnitude entries of each leaf and zeroes the rest.

  k = round(fraction * leaf size), at least 1. Ties are broken by position
  (`lax.top_k`), so exactly k entries survive.

  Args:
    fraction: kept fraction of each leaf, in (0, 1].

  Returns:
    A transform whose info holds 'bytes_sent' = sum over leaves of
    k * (itemsize + 4), the values plus their int32 indices.
  """
  fraction = float(fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'top_k(fraction={fraction}): fraction must lie in '
                     '(0, 1]; it is the share of entries kept per leaf.')

  def sparsify(x):
    flat = x.reshape(-1)
    k = top_k_count(flat.size, fraction)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    kept = jnp.zeros_like(flat).at[idx].set(flat[idx])
    return kept.reshape(x.shape)

  def transform(delta, key):
    del key  # Deterministic.
    num_bytes = sum(
        top_k_count(math.prod(x.shape), fraction) *
        (jnp.dtype(x.dtype).itemsize + _INDEX_BYTES)
        for x in jax.tree_util.tree_leaves(delta))
    return jax.tree.map(sparsify, delta), _bytes_info(num_bytes)

  return transform


def compose(*transforms: Transform) -> Transform:
  """Applies `transforms` left to right, each with its own split key.

  Info dicts are merged; where two report the same key (e.g. 'bytes_sent')
  the later one wins, because the last encoding is what goes on the wire.
  Note that `compose(top_k(f), stochastic_quantize(b))` therefore counts the
  quantised update as dense; sparse-and-quantised wire formats are not
  modelled.
  """
  for i, t in enumerate(transforms):
    if not callable(t):
      raise ValueError(f'compose() argument {i} is {t!r}, not a transform; '
                       'pass the result of a factory such as top_k(0.1).')

  def transform(delta, key):
    info = {}
    keys = jax.random.split(key, max(len(transforms), 1))
    for t, k in zip(transforms, keys):
      delta, step_info = t(delta, k)
      info.update(step_info)
    return delta, info

  return transform


COMPRESSORS: dict[str, Callable[..., Transform]] = {
    'none': identity,
    'identity': identity,
    'quantize': stochastic_quantize,
    'stochastic_quantize': stochastic_quantize,
    'top_k': top_k,
}


def get_compression(name: str, **kwargs) -> Transform:
  """Builds the compression transform called `name` (see COMPRESSORS)."""
  if name not in COMPRESSORS:
    raise ValueError(f'Unknown compression {name!r}; choose one of '
                     f'{sorted(COMPRESSORS)}.')
  try:
    return COMPRESSORS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f'Bad arguments {kwargs} for compression {name!r}: '
                     f'{e}.') from e
