"""Simulated secure aggregation with pairwise masks that cancel in the sum.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning". Each client encodes its update as fixed-point integers in
the ring Z_{2^32} (uint32 arithmetic wraps, so the ring is free), and for every
other participating client j adds a pseudo-random mask m_ij when j > i and
subtracts it when j < i. Summed over the participants every mask appears once
with each sign and vanishes, so the server learns the exact sum of the
encodings and nothing else about any one update: a masked update is uniform on
the ring whenever at least one other client is active.

What is simulated, and how:
  * Pair secrets. In the protocol m_ij comes from a Diffie-Hellman agreement;
    here it is `fold_in(fold_in(round_key, min(i, j)), max(i, j))`, one key per
    unordered pair, drawing one mask for all leaves laid end to end.
  * Dropouts before masking. Clients that are already gone when masks are
    derived (`active_mask` False) send nothing and no mask involves them.
  * Dropouts after masking. Clients that masked but never submitted leave
    their pair masks uncancelled in the survivors' sum; `unmask_sum` removes
    them as the protocol's server does after reconstructing the dropped
    clients' pair secrets from the survivors' Shamir shares. The double-masking
    self-mask b_i only guards against a server that lies about who dropped,
    which a simulation has no need for, so it is omitted.

Fixed-point range: the plain sum must stay inside (-2^31, 2^31) after scaling;
`fixed_point_scale` picks the largest power-of-two scale that guarantees it.
Decoding error per coordinate is at most n / (2 * scale) for n summed clients
(plus float32 rounding once a decoded sum exceeds 2^24 / scale).

Cost: every client draws one mask per partner, so a round draws C^2 * D
pseudo-random words for C clients and D parameters; it is a simulation for
correctness studies, not a fast path for large cohorts.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_ext import aggregators

PyTree = Any

# Largest float32 below 2^31 (float32 spacing there is 128), so the int32
# cast after clamping never overflows.
_INT32_LIMIT = float(2 ** 31 - 128)


def fixed_point_scale(max_abs: float, num_clients: int) -> float:
  """Largest power of two s with num_clients * max_abs * s < 2^31 - 128.

  Args:
    max_abs: bound on |entry| of any one (weighted) client update.
    num_clients: how many updates are summed.
  """
  if not max_abs > 0 or not num_clients >= 1:
    raise ValueError('fixed_point_scale needs max_abs > 0 and num_clients >= '
                     f'1; got max_abs={max_abs}, num_clients={num_clients}.')
  return 2.0 ** math.floor(math.log2(_INT32_LIMIT / (num_clients * max_abs)))


def encode(tree: PyTree, scale: float) -> PyTree:
  """Fixed-point encodes float leaves as uint32 ring elements.

  Entries are rounded to the nearest multiple of 1 / scale and clamped to the
  int32 range; two's complement maps negatives onto the ring.
  """
  if not scale > 0:
    raise ValueError(f'encode(scale={scale}): scale must be > 0; see '
                     'fixed_point_scale.')

  def leaf(x):
    y = jnp.clip(jnp.round(x.astype(jnp.float32) * scale), -_INT32_LIMIT,
                 _INT32_LIMIT)
    return jax.lax.bitcast_convert_type(y.astype(jnp.int32), jnp.uint32)

  return jax.tree.map(leaf, tree)


def decode(tree: PyTree, scale: float) -> PyTree:
  """Inverse of `encode` (up to rounding): uint32 ring elements to float32."""
  if not scale > 0:
    raise ValueError(f'decode(scale={scale}): scale must be > 0.')
  return jax.tree.map(
      lambda x: jax.lax.bitcast_convert_type(x, jnp.int32).astype(jnp.float32)
      / scale, tree)


def _flatten_encoded(stacked: PyTree) -> tuple[jax.Array, Any]:
  """Checks encoded leaves and joins them into one [C, D] uint32 matrix.

  One matrix means one pseudo-random draw per pair of clients, whatever the
  number of leaves. Returns the matrix and a function that splits it back.
  """
  leaves, treedef = jax.tree_util.tree_flatten(stacked)
  if not leaves:
    raise ValueError('Nothing to mask: the PyTree has no leaves.')
  for x in leaves:
    if x.dtype != jnp.uint32:
      raise ValueError(f'Masking works on encoded updates; got a {x.dtype} '
                       'leaf. Call encode(stacked, scale) first.')
  sizes = {x.shape[0] if x.ndim else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError('Every leaf needs the same leading client axis [C, ...];'
                     f' got {sorted(map(str, sizes))}.')
  num = sizes.pop()
  shapes = [x.shape[1:] for x in leaves]
  flat = jnp.concatenate([x.reshape(num, -1) for x in leaves], axis=1)

  def unflatten(matrix):
    lead = matrix.shape[:-1]
    cuts = list(itertools.accumulate(math.prod(s) for s in shapes))[:-1]
    parts = jnp.split(matrix, cuts, axis=-1)
    return jax.tree_util.tree_unflatten(
        treedef, [p.reshape(lead + s) for p, s in zip(parts, shapes)])

  return flat, unflatten


def pair_mask(key: jax.Array, i, j, size: int) -> jax.Array:
  """The [size] uint32 mask shared by clients i and j (symmetric in i, j)."""
  lo, hi = jnp.minimum(i, j), jnp.maximum(i, j)
  pair_key = jax.random.fold_in(jax.random.fold_in(key, lo), hi)
  return jax.random.bits(pair_key, (size,), jnp.uint32)


def client_mask(key: jax.Array, i, partners: jax.Array, size: int) -> jax.Array:
  """Client i's total mask: + m_ij for partners j > i, - m_ij for j < i."""

  def body(j, acc):
    m = pair_mask(key, i, j, size)
    signed = jnp.where(j > i, acc + m, acc - m)
    return jnp.where(partners[j] & (j != i), signed, acc)

  return jax.lax.fori_loop(0, partners.shape[0], body,
                           jnp.zeros((size,), jnp.uint32))


def _as_mask(mask, num: int, name: str) -> jax.Array:
  mask = jnp.asarray(mask, bool)
  if mask.shape != (num,):
    raise ValueError(f'{name} must be a [C] bool array with C = {num}; got '
                     f'shape {mask.shape}.')
  return mask


def mask_updates(stacked: PyTree, key: jax.Array,
                 active_mask: jax.Array) -> PyTree:
  """What the server receives: each active client's encoding plus its mask.

  Args:
    stacked: encoded updates (uint32 leaves) with a leading client axis [C].
    key: the round key all pair secrets derive from.
    active_mask: [C] bool, clients taking part when masks are agreed;
      inactive rows come back as zeros (nothing was sent).
  """
  flat, unflatten = _flatten_encoded(stacked)
  num, size = flat.shape
  active = _as_mask(active_mask, num, 'active_mask')
  masks = jax.vmap(lambda i: client_mask(key, i, active, size))(
      jnp.arange(num))
  return unflatten(jnp.where(active[:, None], flat + masks, 0))


def unmask_sum(masked: PyTree, key: jax.Array, active_mask: jax.Array,
               submitted_mask: jax.Array | None = None) -> PyTree:
  """The server's modular sum of the survivors' encodings, masks removed.

  Args:
    masked: output of `mask_updates`.
    key: the same round key.
    active_mask: [C] bool, who masked (the `active_mask` given to
      `mask_updates`).
    submitted_mask: [C] bool, whose masked update reached the server; None
      means every active client. Active clients that did not submit are
      dropouts whose pair masks the server recovers and removes.

  Returns:
    A PyTree of uint32 sums (no client axis); `decode` it.
  """
  flat, unflatten = _flatten_encoded(masked)
  num, size = flat.shape
  active = _as_mask(active_mask, num, 'active_mask')
  submitted = active if submitted_mask is None else (
      _as_mask(submitted_mask, num, 'submitted_mask') & active)
  dropped = active & ~submitted
  total = jnp.sum(jnp.where(submitted[:, None], flat, 0), axis=0,
                  dtype=jnp.uint32)
  # Survivor j's mask towards the dropped clients is what stays uncancelled.
  leftover = jax.vmap(lambda i: client_mask(key, i, dropped, size))(
      jnp.arange(num))
  residue = jnp.sum(jnp.where(submitted[:, None], leftover, 0), axis=0,
                    dtype=jnp.uint32)
  return unflatten(total - residue)


def secure_sum(stacked: PyTree, key: jax.Array, scale: float,
               active_mask: jax.Array,
               submitted_mask: jax.Array | None = None) -> PyTree:
  """encode -> mask -> unmask_sum -> decode: the float sum the server learns."""
  masked = mask_updates(encode(stacked, scale), key, active_mask)
  return decode(unmask_sum(masked, key, active_mask, submitted_mask), scale)


def secure_weighted_mean(scale: float, clamp: float | None = None,
                         late_dropout_rate: float = 0.0):
  """Aggregator hook `(stacked, weights, key) -> (mean, metrics)` via SecAgg.

  Included clients (weight > 0, finite update) send w_i * delta_i through the
  masked sum; excluded ones drop out before masking. The weights themselves
  are public to the server, as in FedAvg with secure aggregation of the
  weighted update. `metrics['secagg_range_used']` is the largest
  sum_i |w_i delta_i| * scale / 2^31 over coordinates; at or above 1 the
  fixed-point sum may wrap, so lower `scale`.

  Args:
    scale: the fixed-point scale (`fixed_point_scale`).
    clamp: if set, each coordinate of delta_i is clamped to [-clamp, clamp]
      before weighting, so a range chosen for `clamp` can never wrap.
    late_dropout_rate: the chance that a client drops after masking; the
      server removes its masks (`unmask_sum`) and averages the rest.
  """
  if not scale > 0:
    raise ValueError(f'secure_weighted_mean(scale={scale}): scale must be > 0;'
                     ' see fixed_point_scale.')
  if clamp is not None and not clamp > 0:
    raise ValueError(f'secure_weighted_mean(clamp={clamp}): must be > 0.')
  if not 0.0 <= late_dropout_rate < 1.0:
    raise ValueError('late_dropout_rate must lie in [0, 1); got '
                     f'{late_dropout_rate}.')

  def aggregate(stacked, weights, key):
    inc = aggregators.included_mask(stacked, weights)
    mask_key, drop_key = jax.random.split(key)
    submitted = inc & (jax.random.uniform(drop_key, inc.shape)
                       >= late_dropout_rate)
    w = jnp.where(inc, jnp.asarray(weights, jnp.float32), 0.0)

    def weigh(x):
      x = x.astype(jnp.float32)
      if clamp is not None:
        x = jnp.clip(x, -clamp, clamp)
      wx = w.reshape(w.shape + (1,) * (x.ndim - 1)) * x
      return jnp.where(jnp.isfinite(wx), wx, 0.0)

    weighted = jax.tree.map(weigh, stacked)
    total = decode(
        unmask_sum(mask_updates(encode(weighted, scale), mask_key, inc),
                   mask_key, inc, submitted), scale)
    w = jnp.where(submitted, w, 0.0)
    denom = jnp.sum(w)
    safe = jnp.where(denom > 0, denom, 1.0)
    mean = jax.tree.map(lambda t, x: (t / safe).astype(x.dtype), total,
                        stacked)
    used = jnp.max(jnp.stack([
        jnp.max(jnp.sum(jnp.abs(x), axis=0))
        for x in jax.tree_util.tree_leaves(weighted)])) * scale / 2.0 ** 31
    return mean, {'num_included': jnp.sum(submitted).astype(jnp.float32),
                  'secagg_late_dropouts': jnp.sum(inc & ~submitted).astype(
                      jnp.float32),
                  'secagg_range_used': used}

  return aggregate
