"""DP-FedAvg through secure aggregation, against central DP-FedAvg."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_ext import privacy
from fedjax_ext import secure_aggregation
from fedjax_ext import secure_dp


def _updates(num: int, dim: int = 6, seed: int = 0):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=(num, dim)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(num, 2)), jnp.float32)}


def _tolerance(config, num):
  # Each client's encoding rounds a coordinate by at most 1 / (2 scale);
  # decoding casts a sum below 2^31 to float32, off by at most 2^31 * 2^-24
  # = 128 units; the server multiplies by c / m.
  scale = secure_aggregation.fixed_point_scale(secure_dp._range_bound(config),
                                               num)
  return ((num / 2 + 128) / scale * config.clip_norm /
          config.expected_num_clients)


def test_without_noise_it_equals_central_dp_fedavg():
  config = privacy.DPConfig(noise_multiplier=0.0, clip_norm=1.5,
                            expected_num_clients=4)
  stacked = _updates(4)
  weights = jnp.array([3.0, 0.0, 5.0, 1.0])  # client 1 is excluded
  key = jax.random.key(0)
  secure = secure_dp.secure_dp_aggregator(config, max_clients=4)
  central = privacy.dp_aggregator(config)
  agg, _, metrics = secure.aggregate(secure.init(), stacked, weights, key)
  want, _, _ = central.aggregate(central.init(), stacked, weights, key)
  for k in stacked:
    np.testing.assert_allclose(agg[k], want[k], atol=_tolerance(config, 4))
  assert float(metrics['num_included']) == 3.0


def test_late_dropouts_leave_only_the_submitted_clients_in_the_sum():
  config = privacy.DPConfig(noise_multiplier=0.0, clip_norm=1.0,
                            expected_num_clients=6)
  stacked = _updates(6, seed=1)
  weights = jnp.ones(6)
  key = jax.random.key(3)
  secure = secure_dp.secure_dp_aggregator(config, max_clients=6,
                                          late_dropout_rate=0.5)
  agg, _, metrics = secure.aggregate(secure.init(), stacked, weights, key)
  _, _, drop_key = jax.random.split(key, 3)
  submitted = np.asarray(jax.random.uniform(drop_key, (6,)) >= 0.5)
  assert 0 < submitted.sum() < 6  # this key drops some, keeps some
  assert float(metrics['num_included']) == submitted.sum()
  assert float(metrics['secagg_late_dropouts']) == 6 - submitted.sum()
  clipped, _ = jax.vmap(privacy.clip_by_norm, in_axes=(0, None))(stacked, 1.0)
  for k in stacked:
    want = np.sum(np.asarray(clipped[k])[submitted], axis=0) / 6
    np.testing.assert_allclose(agg[k], want, atol=_tolerance(config, 6))


def test_summed_noise_has_the_central_std():
  # m = 4 clients each add std z / 2, so the sum of units has std z and the
  # aggregate std z c / m, the same as central DP-FedAvg.
  z, c, m, dim = 1.3, 0.5, 4, 20000
  config = privacy.DPConfig(noise_multiplier=z, clip_norm=c,
                            expected_num_clients=m)
  stacked = {'w': jnp.zeros((m, dim), jnp.float32)}
  secure = secure_dp.secure_dp_aggregator(config, max_clients=m)
  agg, _, metrics = secure.aggregate(secure.init(), stacked, jnp.ones(m),
                                     jax.random.key(5))
  measured = float(np.std(np.asarray(agg['w'])))
  assert abs(measured / (z * c / m) - 1) < 0.03  # 3% > 4 / sqrt(2 * dim)
  assert math.isclose(float(metrics['dp_noise_std']), z * c / m,
                      rel_tol=1e-6)


def test_adaptive_clip_moves_by_the_securely_counted_fraction():
  config = privacy.DPConfig(noise_multiplier=0.0, clip_norm=1.0,
                            expected_num_clients=5, adaptive=True,
                            target_quantile=0.5, clip_learning_rate=0.2,
                            clipped_count_stddev=0.0)
  stacked = {'w': jnp.asarray(np.diag([0.5, 0.8, 2.0, 3.0, 4.0])[:, :3],
                              jnp.float32)}
  # Norms 0.5, 0.8, 2, 0, 0: four clients are at or below the clip of 1.
  secure = secure_dp.secure_dp_aggregator(config, max_clients=5)
  _, state, metrics = secure.aggregate(secure.init(), stacked, jnp.ones(5),
                                       jax.random.key(0))
  assert float(metrics['dp_unclipped_fraction']) == pytest.approx(0.8)
  assert float(state.clip_norm) == pytest.approx(math.exp(-0.2 * 0.3))


def test_refuses_fewer_than_two_clients_and_bad_rates():
  config = privacy.DPConfig(noise_multiplier=1.0, clip_norm=1.0,
                            expected_num_clients=1)
  with pytest.raises(ValueError, match='at least 2 clients'):
    secure_dp.secure_dp_aggregator(config, max_clients=1)
  with pytest.raises(ValueError, match='late_dropout_rate'):
    secure_dp.secure_dp_aggregator(config, max_clients=4,
                                   late_dropout_rate=1.0)
