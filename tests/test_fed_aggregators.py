"""Tests for fedjax_ext.aggregators against NumPy / SciPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedjax_ext import aggregators

KEY = jax.random.key(0)


def _stack(rng, num_clients, include_nan_at=None):
  tree = {
      'dense/kernel': rng.normal(size=(num_clients, 3, 4)).astype(np.float32),
      'dense/bias': rng.normal(size=(num_clients, 5)).astype(np.float32),
  }
  if include_nan_at is not None:
    tree['dense/bias'][include_nan_at, 0] = np.nan
  return tree


def _loop_reference(tree, weights, fn):
  """Applies fn to the included rows of every leaf, one leaf at a time."""
  keep = np.asarray(weights) > 0
  return {k: fn(v[keep]) for k, v in tree.items()}


def _assert_tree_close(got, want, atol=1e-5):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=atol,
                               err_msg=k)


def test_weighted_mean_by_hand():
  deltas = {'w': jnp.array([[1.0], [2.0], [3.0], [np.nan]])}
  weights = jnp.array([1.0, 0.0, 3.0, 0.0])  # The NaN client is dropped.
  agg, metrics = jax.jit(aggregators.weighted_mean())(deltas, weights, KEY)
  np.testing.assert_allclose(agg['w'], [(1 * 1 + 3 * 3) / 4.0])
  assert metrics['num_included'] == 2
  assert metrics['total_weight'] == 4


def test_weighted_mean_matches_numpy():
  rng = np.random.default_rng(1)
  tree = _stack(rng, 6)
  weights = np.array([3.0, 0.0, 1.0, 2.0, 0.0, 5.0], np.float32)
  agg, _ = jax.jit(aggregators.weighted_mean())(tree, weights, KEY)
  want = {k: np.tensordot(weights, v, axes=1) / weights.sum()
          for k, v in tree.items()}
  _assert_tree_close(agg, want)


@pytest.mark.parametrize('weights', [
    [1, 0, 2, 1, 0, 1, 4, 1, 1],  # 7 included: odd.
    [1, 0, 2, 1, 0, 1, 4, 0, 1],  # 6 included: even.
])
def test_median_matches_numpy_and_ignores_zero_weight(weights):
  tree = _stack(np.random.default_rng(3), 9, include_nan_at=4)
  weights = np.asarray(weights, np.float32)
  agg, metrics = jax.jit(aggregators.coordinate_median())(tree, weights, KEY)
  _assert_tree_close(agg, _loop_reference(
      tree, weights, lambda x: np.median(x, axis=0)))
  assert metrics['num_included'] == np.sum(weights > 0)


@pytest.mark.parametrize('trim', [0.0, 0.1, 0.25, 0.4])
def test_trimmed_mean_matches_scipy(trim):
  tree = _stack(np.random.default_rng(4), 12, include_nan_at=0)
  weights = np.array([0, 1, 1, 2, 1, 1, 0, 1, 1, 1, 3, 1], np.float32)
  agg, metrics = jax.jit(aggregators.trimmed_mean(trim))(tree, weights, KEY)
  _assert_tree_close(agg, _loop_reference(
      tree, weights, lambda x: scipy.stats.trim_mean(x, trim, axis=0)))
  assert metrics['num_trimmed_each_side'] == int(trim * 10)


def _krum_scores_loop(tree, weights, f):
  """Blanchard et al.'s score with a plain Python loop over clients."""
  keep = np.flatnonzero(np.asarray(weights) > 0)
  flat = np.concatenate([v.reshape(v.shape[0], -1) for v in tree.values()],
                        axis=1).astype(np.float64)
  n = len(keep)
  scores = np.full(len(weights), np.inf)
  for i in keep:
    d = sorted(np.sum((flat[i] - flat[j]) ** 2) for j in keep if j != i)
    scores[i] = sum(d[:n - f - 2])
  return scores


def test_krum_scores_match_loop():
  rng = np.random.default_rng(5)
  tree = _stack(rng, 9, include_nan_at=3)
  weights = np.array([1, 1, 1, 0, 1, 2, 1, 0, 1], np.float32)
  got = jax.jit(aggregators.krum_scores, static_argnums=2)(tree, weights, 1)
  np.testing.assert_allclose(got, _krum_scores_loop(tree, weights, 1),
                             rtol=1e-4)


def test_multi_krum_averages_best_scored():
  rng = np.random.default_rng(6)
  tree = _stack(rng, 9)
  weights = np.array([1, 0, 1, 1, 1, 2, 1, 1, 1], np.float32)
  scores = _krum_scores_loop(tree, weights, 2)
  best = np.argsort(scores)[:3]
  agg, metrics = jax.jit(aggregators.krum(2, multi_k=3))(tree, weights, KEY)
  _assert_tree_close(agg, {k: v[best].mean(0) for k, v in tree.items()})
  assert metrics['krum_best_client'] == best[0]
  assert metrics['num_selected'] == 3


def test_robust_rules_survive_byzantine_clients_where_mean_does_not():
  rng = np.random.default_rng(7)
  honest, byzantine = 10, 3
  x = rng.normal(1.0, 0.1, size=(honest + byzantine, 50)).astype(np.float32)
  x[honest:] = 1e4  # Huge, identical malicious updates.
  weights = np.ones(honest + byzantine, np.float32)
  weights[2] = 0.0  # A dropped honest client.
  tree = {'w': jnp.asarray(x)}
  honest_mean = x[:honest][weights[:honest] > 0].mean(0)

  mean_fn = jax.jit(aggregators.weighted_mean())
  mean, _ = mean_fn(tree, weights, KEY)
  assert np.abs(mean['w'] - honest_mean).max() > 1000
  empty, _ = mean_fn(tree, np.zeros_like(weights), KEY)
  np.testing.assert_array_equal(empty['w'], 0.0)
  for name, kwargs in [('median', {}),
                       ('trimmed_mean', {'trim_fraction': 0.3}),
                       ('krum', {'num_byzantine': byzantine})]:
    jitted = jax.jit(aggregators.get_aggregator(name, **kwargs))
    agg, metrics = jitted(tree, weights, KEY)
    # Honest coordinates have std 0.1; robust rules land within a few.
    assert np.abs(agg['w'] - honest_mean).max() < 0.5, name
    if name == 'krum':
      assert int(metrics['krum_best_client']) < honest
      assert int(metrics['krum_best_client']) != 2
      assert metrics['krum_condition'] == 1.0
    # With nobody included the server must stay put: zeros, never NaN.
    empty, metrics = jitted(tree, np.zeros_like(weights), KEY)
    np.testing.assert_array_equal(empty['w'], 0.0, err_msg=name)
    assert metrics['num_included'] == 0


def test_jitted_aggregator_does_not_recompile():
  tree = _stack(np.random.default_rng(8), 7)
  jitted = jax.jit(aggregators.coordinate_median())
  jitted(tree, jnp.array([1, 2, 0, 1, 3, 0, 1.0]), KEY)
  jitted(tree, jnp.array([0, 1, 1, 1, 1, 1, 0.0]), KEY)
  assert jitted._cache_size() == 1  # pylint: disable=protected-access


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='choose one of'):
    aggregators.get_aggregator('geometric_median')
  with pytest.raises(ValueError, match='trim_fraction'):
    aggregators.trimmed_mean(0.5)
  with pytest.raises(ValueError, match='multi_k'):
    aggregators.get_aggregator('multi_krum', num_byzantine=1)
  with pytest.raises(ValueError, match='Bad arguments'):
    aggregators.get_aggregator('krum', f=1)
  with pytest.raises(ValueError, match='2f \\+ 3'):
    aggregators.krum(2)({'w': jnp.ones((6, 2))}, jnp.ones(6), KEY)
  with pytest.raises(ValueError, match='weights must have shape'):
    aggregators.weighted_mean()({'w': jnp.ones((4, 2))}, jnp.ones(3), KEY)
