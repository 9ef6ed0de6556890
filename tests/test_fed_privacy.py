"""Tests for fedjax_ext.privacy: clipping, DP noise, adaptive clip, epsilon."""
import math

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import stats

from fedjax_ext import privacy

KEY = jax.random.key(0)


def test_clip_bounds_norm_and_leaves_small_updates_alone():
  transform = jax.jit(privacy.clip(1.5))
  big = {'a': jnp.full((3, 4), 2.0), 'b': jnp.ones((5,))}
  out, info = transform(big, KEY)
  norm = math.sqrt(12 * 4.0 + 5)
  np.testing.assert_allclose(info['update_norm'], norm, rtol=1e-6)
  assert info['was_clipped'] == 1.0
  got = math.sqrt(sum(float(jnp.sum(x ** 2)) for x in out.values()))
  assert got <= 1.5 * (1 + 1e-6)
  np.testing.assert_allclose(out['a'], 2.0 * 1.5 / norm, rtol=1e-6)
  small = {'a': jnp.full((3, 4), 0.1), 'b': jnp.zeros((5,))}
  out, info = transform(small, KEY)
  np.testing.assert_array_equal(out['a'], small['a'])
  assert info['was_clipped'] == 0.0


def test_fixed_denominator_sum_without_noise():
  config = privacy.DPConfig(noise_multiplier=0.0, clip_norm=1.0,
                            expected_num_clients=10)
  deltas = {'w': jnp.array([[0.3, 0.4], [3.0, 4.0], [np.nan, 1.0],
                            [6.0, 8.0]])}
  weights = jnp.array([1.0, 7.0, 1.0, 0.0])  # NaN and weight-0 dropped.
  agg, metrics = jax.jit(privacy.dp_mean_aggregator(config))(
      deltas, weights, KEY)
  # Each included client counts once: (0.3, 0.4) + (0.6, 0.8) over m = 10.
  np.testing.assert_allclose(agg['w'], [0.09, 0.12], rtol=1e-6)
  assert metrics['num_included'] == 2


def test_noise_std_matches_config():
  z, clip_norm, m = 1.3, 2.0, 10
  config = privacy.DPConfig(noise_multiplier=z, clip_norm=clip_norm,
                            expected_num_clients=m)
  deltas = {'w': jnp.zeros((8, 40000))}
  agg, metrics = jax.jit(privacy.dp_mean_aggregator(config))(
      deltas, jnp.ones(8), KEY)
  noise = np.concatenate([np.ravel(x) for x in agg.values()])
  n, want = noise.size, z * clip_norm / m
  np.testing.assert_allclose(metrics['dp_noise_std'], want, rtol=1e-6)
  # The sample std of n Gaussians has relative std 1 / sqrt(2n); allow 5.
  assert abs(noise.std() / want - 1) < 5 / math.sqrt(2 * n)
  assert abs(noise.mean()) < 5 * want / math.sqrt(n)


def test_adaptive_update_noise_follows_andrew_theorem_1():
  config = privacy.DPConfig(noise_multiplier=1.0, clip_norm=3.0,
                            expected_num_clients=20, adaptive=True,
                            clipped_count_stddev=1.0)
  # z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) = (1 - 1/4)^(-1/2).
  assert config.update_noise_multiplier == pytest.approx(1 / math.sqrt(0.75))
  dp = privacy.dp_aggregator(config)
  _, _, metrics = jax.jit(dp.aggregate)(
      dp.init(), {'w': jnp.zeros((4, 3))}, jnp.ones(4), KEY)
  np.testing.assert_allclose(metrics['dp_noise_std'],
                             3.0 / math.sqrt(0.75) / 20, rtol=1e-6)


@pytest.mark.parametrize('target', [0.2, 0.7])
def test_adaptive_clip_tracks_target_quantile(target):
  m, dim, rounds = 100, 4, 200
  dp = privacy.dp_aggregator(privacy.DPConfig(
      noise_multiplier=1.0, clip_norm=0.5, expected_num_clients=m,
      adaptive=True, target_quantile=target, clip_learning_rate=0.2))
  aggregate = jax.jit(lambda state, deltas, r: dp.aggregate(
      state, deltas, jnp.ones(m), jax.random.fold_in(KEY, r)))
  rng = np.random.default_rng(0)
  state, trace = dp.init(), []
  for r in range(rounds):
    norms = rng.uniform(0.0, 10.0, size=(m, 1))  # A fixed law of norms.
    dirs = rng.normal(size=(m, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    _, state, _ = aggregate(state, {'w': dirs * norms}, r)
    trace.append(state.clip_norm)
  trace = np.asarray(trace)
  # Norms are U(0, 10), so the target quantile sits at 10 * target; the
  # clip starts 4x to 14x below it and must end within 0.1 in quantile.
  assert abs(np.mean(trace[-50:]) / 10 - target) < 0.1
  assert trace[0] > 0.5  # Every norm exceeds the first clip: it grows.


def test_epsilon_matches_dp_accounting_directly():
  z, q, rounds, delta = 1.1, 0.01, 500, 1e-5
  accountant = rdp_privacy_accountant.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
      rounds))
  want = accountant.get_epsilon(delta)
  assert privacy.compute_epsilon(z, q, rounds, delta) == pytest.approx(want)


def test_pld_matches_analytic_gaussian_without_sampling():
  # With q = 1, T rounds of noise z compose to one Gaussian mechanism of
  # noise s = z / sqrt(T), whose exact curve (Balle & Wang 2018) is
  # delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s).
  z, rounds, delta = 4.0, 16, 1e-5
  s = z / math.sqrt(rounds)

  def gap(eps):
    return (stats.norm.cdf(1 / (2 * s) - eps * s) -
            math.exp(eps) * stats.norm.cdf(-1 / (2 * s) - eps * s) - delta)

  exact = optimize.brentq(gap, 0.0, 50.0)
  pld = privacy.compute_epsilon(z, 1.0, rounds, delta, accountant='pld')
  rdp = privacy.compute_epsilon(z, 1.0, rounds, delta, accountant='rdp')
  assert pld == pytest.approx(exact, rel=1e-3)
  assert exact <= rdp < 1.2 * exact  # RDP is a valid, slightly loose bound.


def test_epsilon_monotone_in_noise_and_rounds():
  eps = lambda z, t: privacy.compute_epsilon(z, 0.02, t, 1e-5)
  assert eps(0.8, 200) > eps(1.0, 200) > eps(2.0, 200)
  assert eps(1.0, 50) < eps(1.0, 200) < eps(1.0, 800)
  assert privacy.compute_epsilon(0.0, 0.1, 10, 1e-5) == math.inf
  assert privacy.compute_epsilon(1.0, 0.1, 0, 1e-5) == 0.0


def test_epsilon_for_config_and_sampling_without_replacement():
  config = privacy.DPConfig(noise_multiplier=1.0, clip_norm=1.0,
                            expected_num_clients=50)
  got = privacy.epsilon_for_config(config, population_size=5000, rounds=100,
                                   delta=1e-4)
  assert got == pytest.approx(privacy.compute_epsilon(1.0, 0.01, 100, 1e-4))
  wor = privacy.compute_epsilon(1.0, 0.01, 100, 1e-4,
                                sampling='without_replacement',
                                population_size=5000)
  assert 0 < wor < math.inf
  with pytest.raises(ValueError, match='population_size'):
    privacy.epsilon_for_config(config, population_size=10, rounds=1,
                               delta=1e-4)
  with pytest.raises(ValueError, match='only supported'):
    privacy.compute_epsilon(1.0, 0.01, 10, 1e-4, accountant='pld',
                            sampling='without_replacement',
                            population_size=100)


@pytest.mark.parametrize('kwargs, field', [
    ({'noise_multiplier': -0.1}, 'noise_multiplier'),
    ({'noise_multiplier': float('nan')}, 'noise_multiplier'),
    ({'clip_norm': 0.0}, 'clip_norm'),
    ({'clip_norm': -1.0}, 'clip_norm'),
    ({'expected_num_clients': 0}, 'expected_num_clients'),
    ({'expected_num_clients': 2.5}, 'expected_num_clients'),
    ({'target_quantile': 0.0}, 'target_quantile'),
    ({'target_quantile': 1.0}, 'target_quantile'),
    ({'target_quantile': 1.5}, 'target_quantile'),
    ({'clip_learning_rate': 0.0}, 'clip_learning_rate'),
    ({'clipped_count_stddev': -1.0}, 'clipped_count_stddev'),
    ({'adaptive': True, 'clipped_count_stddev': 0.4},
     'clipped_count_stddev'),
])
def test_invalid_dp_config_names_the_field(kwargs, field):
  settings = {'noise_multiplier': 1.0, 'clip_norm': 1.0,
              'expected_num_clients': 100}
  settings.update(kwargs)
  with pytest.raises(ValueError, match=f'DPConfig.{field}'):
    privacy.DPConfig(**settings)


def test_other_bad_inputs_raise():
  with pytest.raises(ValueError, match='norm'):
    privacy.clip(0.0)
  with pytest.raises(ValueError, match='dp_aggregator'):
    privacy.dp_mean_aggregator(privacy.DPConfig(1.0, 1.0, 100, adaptive=True))
  for args in [(-1.0, 0.1, 10, 1e-5), (1.0, 0.0, 10, 1e-5),
               (1.0, 1.5, 10, 1e-5), (1.0, 0.1, -1, 1e-5),
               (1.0, 0.1, 10, 0.0)]:
    with pytest.raises(ValueError):
      privacy.compute_epsilon(*args)
  with pytest.raises(ValueError, match='accountant'):
    privacy.compute_epsilon(1.0, 0.1, 10, 1e-5, accountant='moments')


def test_epsilon_curve_equals_compute_epsilon_without_replacement():
  curve = privacy.epsilon_curve(1.3, 10, 160, 1e-5)
  assert curve(0) == 0.0
  for rounds in (1, 5, 40):
    assert curve(rounds) == privacy.compute_epsilon(
        1.3, 10 / 160, rounds, 1e-5, sampling='without_replacement',
        population_size=160)
  silent = privacy.epsilon_curve(0.0, 10, 160, 1e-5)
  assert silent(0) == 0.0 and silent(3) == math.inf
