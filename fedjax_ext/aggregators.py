"""Server-side aggregators: weighted mean and Byzantine-robust rules.

Every aggregator has one shape,

    aggregator(stacked_deltas, weights, key) -> (aggregate, metrics)

where `stacked_deltas` is a PyTree whose leaves carry a leading client axis
`[C, ...]`, `weights` is `[C]` (0 for a dropped, padded or excluded client) and
`key` is a PRNG key (unused by the deterministic rules here, but part of the
shape so that noisy aggregators such as DP plug into the same hook).

A client is *included* when its weight is positive and every entry of its update
is finite; excluded clients never influence the result, not even through a NaN
multiplied by zero. The robust rules weight included clients equally (as in the
papers); positive weights only decide who takes part.

Rules and where they come from:
  * `weighted_mean`: FedAvg (McMahan et al. 2017, "Communication-Efficient
    Learning of Deep Networks from Decentralized Data").
  * `coordinate_median`, `trimmed_mean`: Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates".
  * `krum`, multi-Krum: Blanchard et al. 2017, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent".
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
Metrics = dict[str, jax.Array]
Aggregator = Callable[[PyTree, jax.Array, jax.Array], tuple[PyTree, Metrics]]


def _num_clients(stacked: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(stacked)
  if not leaves:
    raise ValueError('stacked_deltas has no array leaves; pass a PyTree whose '
                     'leaves have a leading client axis [C, ...].')
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError('Every leaf of stacked_deltas needs the same leading '
                     'client axis; got leading sizes '
                     f'{sorted(map(str, sizes))}. Stack client updates with '
                     'jax.tree.map(jnp.stack, ...).')
  return sizes.pop()


def included_mask(stacked: PyTree, weights: jax.Array) -> jax.Array:
  """Returns a [C] bool mask: weight > 0 and the client's update is finite."""
  weights = jnp.asarray(weights)
  num = _num_clients(stacked)
  if weights.shape != (num,):
    raise ValueError(f'weights must have shape [C]=({num},) to match the '
                     f'client axis of stacked_deltas; got {weights.shape}.')
  finite = jnp.ones((num,), bool)
  for leaf in jax.tree_util.tree_leaves(stacked):
    finite &= jnp.all(jnp.isfinite(leaf.reshape(num, -1)), axis=1)
  return (weights > 0) & finite


def _bcast(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def _zero_excluded(stacked: PyTree, inc: jax.Array) -> PyTree:
  return jax.tree.map(
      lambda x: jnp.where(_bcast(inc, x), x, jnp.zeros_like(x)), stacked)


def weighted_mean() -> Aggregator:
  """FedAvg: sum_i w_i * delta_i / sum_i w_i over included clients.

  Returns zeros when no client is included (the server model stays put).
  """

  def aggregate(stacked, weights, key):
    del key  # Deterministic.
    inc = included_mask(stacked, weights)
    w = jnp.where(inc, jnp.asarray(weights, jnp.float32), 0.0)
    total = jnp.sum(w)
    safe_total = jnp.where(total > 0, total, 1.0)
    clean = _zero_excluded(stacked, inc)
    mean = jax.tree.map(
        lambda x: (jnp.tensordot(w, x.astype(jnp.float32), axes=1) /
                   safe_total).astype(x.dtype), clean)
    metrics = {'num_included': jnp.sum(inc).astype(jnp.float32),
               'total_weight': total}
    return mean, metrics

  return aggregate


def _sorted_included(x: jax.Array, inc: jax.Array) -> jax.Array:
  """Sorts along the client axis with excluded clients pushed to the end."""
  return jnp.sort(jnp.where(_bcast(inc, x), x, jnp.inf), axis=0)


def _median_of(stacked: PyTree, inc: jax.Array) -> PyTree:
  n = jnp.sum(inc).astype(jnp.int32)
  lo = jnp.maximum((n - 1) // 2, 0)
  hi = jnp.maximum(n // 2, 0)

  def leaf_median(x):
    s = _sorted_included(x, inc)
    a = jax.lax.dynamic_index_in_dim(s, lo, axis=0, keepdims=False)
    b = jax.lax.dynamic_index_in_dim(s, hi, axis=0, keepdims=False)
    return jnp.where(n > 0, 0.5 * (a + b), jnp.zeros_like(a)).astype(x.dtype)

  return jax.tree.map(leaf_median, stacked)


def coordinate_median() -> Aggregator:
  """Coordinate-wise median of the included clients (Yin et al. 2018).

  With an even number n of included clients the two middle values are
  averaged, as `numpy.median` does.
  """

  def aggregate(stacked, weights, key):
    del key  # Deterministic.
    inc = included_mask(stacked, weights)
    return _median_of(stacked, inc), {
        'num_included': jnp.sum(inc).astype(jnp.float32)}

  return aggregate


def trimmed_mean(trim_fraction: float) -> Aggregator:
  """Coordinate-wise trimmed mean (Yin et al. 2018).

  Per coordinate, drops the k = floor(trim_fraction * n) largest and k smallest
  values among the n included clients and averages the rest, matching
  `scipy.stats.trim_mean(x, trim_fraction)`.

  Args:
    trim_fraction: fraction trimmed from *each* end, in [0, 0.5).
  """
  trim_fraction = float(trim_fraction)
  if not 0.0 <= trim_fraction < 0.5:
    raise ValueError(f'trim_fraction must lie in [0, 0.5) (the fraction cut '
                     f'from each end); got {trim_fraction}.')

  def aggregate(stacked, weights, key):
    del key  # Deterministic.
    inc = included_mask(stacked, weights)
    num = inc.shape[0]
    n = jnp.sum(inc).astype(jnp.int32)
    # The small slack keeps float32 rounding (0.7 * 10 = 6.9999...) from
    # trimming one fewer value than the float64 reference.
    k = jnp.floor(trim_fraction * n.astype(jnp.float32) + 1e-5).astype(
        jnp.int32)
    kept = jnp.maximum(n - 2 * k, 1).astype(jnp.float32)
    rank = jnp.arange(num)

    def leaf_trimmed(x):
      s = _sorted_included(x, inc)
      keep = _bcast((rank >= k) & (rank < n - k), s)
      total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
      return (total / kept).astype(x.dtype)

    metrics = {'num_included': n.astype(jnp.float32),
               'num_trimmed_each_side': k.astype(jnp.float32)}
    return jax.tree.map(leaf_trimmed, stacked), metrics

  return aggregate


def krum_scores(stacked: PyTree, weights: jax.Array,
                num_byzantine: int) -> jax.Array:
  """Krum scores [C]: each client's summed squared distance to its n-f-2
  nearest included neighbours; +inf for excluded clients (Blanchard 2017)."""
  inc = included_mask(stacked, weights)
  num = inc.shape[0]
  n = jnp.sum(inc).astype(jnp.int32)
  # Distances are translation invariant; centring on the robust median keeps
  # the Gram-matrix formula from cancelling catastrophically when updates
  # are large but close to each other.
  centre = _median_of(stacked, inc)
  clean = _zero_excluded(
      jax.tree.map(lambda x, c: x - c[None], stacked, centre), inc)
  gram = jnp.zeros((num, num), jnp.float32)
  for leaf in jax.tree_util.tree_leaves(clean):
    flat = leaf.reshape(num, -1).astype(jnp.float32)
    gram += jnp.dot(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.diag(gram)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  # inf - inf from overflowing Byzantine updates must read as "far", not NaN.
  dist = jnp.where(jnp.isnan(dist), jnp.inf, dist)
  valid = inc[:, None] & inc[None, :] & ~jnp.eye(num, dtype=bool)
  dist = jnp.where(valid, dist, jnp.inf)
  nearest = jnp.sort(dist, axis=1)
  num_neighbours = jnp.maximum(n - num_byzantine - 2, 0)
  take = jnp.arange(num)[None, :] < num_neighbours
  scores = jnp.sum(jnp.where(take, nearest, 0.0), axis=1)
  return jnp.where(inc, scores, jnp.inf)


def krum(num_byzantine: int, multi_k: int = 1) -> Aggregator:
  """Krum / multi-Krum (Blanchard et al. 2017).

  Scores every included client by the summed squared distance to its
  n - f - 2 nearest neighbours and returns the update with the lowest score
  (`multi_k=1`, Krum) or the plain mean of the `multi_k` lowest (multi-Krum).
  The guarantee needs n > 2f + 2 included clients; `metrics['krum_condition']`
  is 1.0 when a round met it.

  Args:
    num_byzantine: f, the number of Byzantine clients tolerated (>= 0).
    multi_k: how many of the best-scored updates are averaged (>= 1).
  """
  if int(num_byzantine) != num_byzantine or num_byzantine < 0:
    raise ValueError(f'num_byzantine must be an integer >= 0; got '
                     f'{num_byzantine}.')
  if int(multi_k) != multi_k or multi_k < 1:
    raise ValueError(f'multi_k must be an integer >= 1; got {multi_k}.')
  num_byzantine, multi_k = int(num_byzantine), int(multi_k)

  def aggregate(stacked, weights, key):
    del key  # Deterministic.
    num = _num_clients(stacked)
    if num < 2 * num_byzantine + 3:
      raise ValueError(f'krum(num_byzantine={num_byzantine}) needs a cohort '
                       f'of at least 2f + 3 = {2 * num_byzantine + 3} clients; '
                       f'got {num}. Lower num_byzantine or sample more.')
    if multi_k > num:
      raise ValueError(f'krum(multi_k={multi_k}) exceeds the cohort size '
                       f'{num}; choose multi_k <= {num}.')
    scores = krum_scores(stacked, weights, num_byzantine)
    order = jnp.argsort(scores)
    chosen = jnp.zeros((num,), bool).at[order[:multi_k]].set(True)
    chosen &= jnp.isfinite(scores)  # Never pick an excluded client.
    count = jnp.sum(chosen)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    picked = _zero_excluded(stacked, chosen)
    agg = jax.tree.map(
        lambda x: (jnp.sum(x.astype(jnp.float32), axis=0) / denom).astype(
            x.dtype), picked)
    n = jnp.sum(jnp.isfinite(scores))
    metrics = {
        'num_included': n.astype(jnp.float32),
        'num_selected': count.astype(jnp.float32),
        'krum_best_client': order[0].astype(jnp.int32),
        'krum_condition': (n > 2 * num_byzantine + 2).astype(jnp.float32),
    }
    return agg, metrics

  return aggregate


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    'mean': weighted_mean,
    'weighted_mean': weighted_mean,
    'median': coordinate_median,
    'coordinate_median': coordinate_median,
    'trimmed_mean': trimmed_mean,
    'krum': krum,
}


def get_aggregator(name: str, **kwargs) -> Aggregator:
  """Builds the aggregator called `name` with its factory's keyword args.

  `multi_krum` is `krum` with `multi_k` given in kwargs.
  """
  factory = AGGREGATORS.get(name)
  if name == 'multi_krum':
    factory = krum
    if 'multi_k' not in kwargs:
      raise ValueError("get_aggregator('multi_krum') needs multi_k=<k>, the "
                       'number of best-scored updates averaged.')
  if factory is None:
    valid = sorted(list(AGGREGATORS) + ['multi_krum'])
    raise ValueError(f'Unknown aggregator {name!r}; choose one of {valid}.')
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f'Bad arguments {kwargs} for aggregator {name!r}: {e}. '
                     f'See the docstring of fedjax_ext.aggregators.'
                     f'{factory.__name__}.') from e
