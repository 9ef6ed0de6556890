"""DP-FedAvg through secure aggregation: clients clip and noise, the server
sees only the masked sum.

Central DP-FedAvg (`privacy.dp_aggregator`) lets the server see every
clipped update before it adds the noise. Here each client does its own part
(the distributed Gaussian mechanism of Kairouz et al. 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
in its continuous form) and secure aggregation (Bonawitz et al. 2017,
`secure_aggregation.py`) hides everything but the sum:

1. client i clips its update to the round's clip norm c and divides it by c
   (so every coordinate lies in [-1, 1] whatever c is, which fixes the
   fixed-point range once, adaptive clipping included);
2. it adds Gaussian noise of std z / sqrt(m) (m = expected clients), so the
   noise of m summed clients has std z, as in central DP-FedAvg; with
   adaptive clipping it also sends its clipped-or-not bit plus noise of std
   sigma_b / sqrt(m);
3. it encodes and masks the result; the server unmasks the sum (removing the
   masks of clients that dropped after masking, as the protocol's server
   does), multiplies by c / m and moves the clip norm.

The server never holds a single client's update, noised or not. If fewer
than m clients are summed the total noise is below z (std z sqrt(n / m)):
the accountant's epsilon assumes m, which is the known shortfall of
distributed noise under dropout; `num_included` is reported every round.

Noise is clamped at `TAIL` standard deviations so the fixed-point sum of a
cohort can never wrap; the clamp changes a coordinate with probability
below 2e-15.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_ext import aggregators
from fedjax_ext import privacy
from fedjax_ext import secure_aggregation

PyTree = Any
TAIL = 8.0


def _range_bound(config: privacy.DPConfig) -> float:
  """Largest |coordinate| a client encodes: 1 + TAIL noise std."""
  m = config.expected_num_clients
  share = max(config.update_noise_multiplier,
              config.count_stddev if config.adaptive else 0.0) / math.sqrt(m)
  return 1.0 + TAIL * share


def _noisy_share(x: jax.Array, key: jax.Array, std: float) -> jax.Array:
  if std == 0:
    return x.astype(jnp.float32)
  noise = jnp.clip(jax.random.normal(key, x.shape), -TAIL, TAIL)
  return x.astype(jnp.float32) + std * noise


def _client_payloads(stacked, inc, c, key, config: privacy.DPConfig):
  """Every client's clipped, scaled, noised update (and clip bit)."""
  m = config.expected_num_clients
  update_std = config.update_noise_multiplier / math.sqrt(m)
  clipped, norms = jax.vmap(privacy.clip_by_norm, in_axes=(0, None))(stacked,
                                                                    c)
  leaves, treedef = jax.tree_util.tree_flatten(clipped)
  keys = jax.random.split(key, len(leaves) + 1)
  noised = [_noisy_share(x / c, k, update_std)
            for x, k in zip(leaves, keys[:-1])]
  payload = {'update': jax.tree_util.tree_unflatten(treedef, noised)}
  if config.adaptive:
    bit = (norms <= c).astype(jnp.float32)
    payload['below'] = _noisy_share(bit, keys[-1],
                                    config.count_stddev / math.sqrt(m))
  return jax.tree.map(
      lambda x: jnp.where(inc.reshape(inc.shape + (1,) * (x.ndim - 1)), x,
                          0.0), payload)


def secure_dp_aggregator(config: privacy.DPConfig, max_clients: int,
                         late_dropout_rate: float = 0.0
                         ) -> privacy.DPAggregator:
  """DP-FedAvg whose server only ever sees the securely aggregated sum.

  Args:
    config: the DP settings (as for `privacy.dp_aggregator`).
    max_clients: the most clients summed in a round (the cohort size); it
      sets the fixed-point scale.
    late_dropout_rate: the chance that a client drops after masking; the
      server then removes its pair masks (simulating the protocol's
      recovery) and the sum misses its update.

  Returns:
    `(init, aggregate)` in `privacy.DPAggregator`'s shape, jittable.
  """
  if not isinstance(config, privacy.DPConfig):
    raise ValueError(f'secure_dp_aggregator needs a DPConfig; got '
                     f'{type(config)}.')
  if not (isinstance(max_clients, int) and max_clients >= 2):
    raise ValueError('Secure aggregation needs at least 2 clients a round; '
                     f'got max_clients={max_clients!r}.')
  if not 0.0 <= late_dropout_rate < 1.0:
    raise ValueError('late_dropout_rate must lie in [0, 1); got '
                     f'{late_dropout_rate}.')
  scale = secure_aggregation.fixed_point_scale(_range_bound(config),
                                               max_clients)
  m = float(config.expected_num_clients)

  def init() -> privacy.DPState:
    return privacy.DPState(clip_norm=jnp.asarray(config.clip_norm,
                                                 jnp.float32))

  def aggregate(state, stacked, weights, key):
    inc = aggregators.included_mask(stacked, weights)
    noise_key, mask_key, drop_key = jax.random.split(key, 3)
    c = state.clip_norm
    payload = _client_payloads(stacked, inc, c, noise_key, config)
    submitted = inc & (jax.random.uniform(drop_key, inc.shape)
                       >= late_dropout_rate)
    total = secure_aggregation.secure_sum(payload, mask_key, scale, inc,
                                          submitted)
    agg = jax.tree.map(lambda t, x: (t * c / m).astype(x.dtype),
                       total['update'], stacked)
    new_c, fraction = c, jnp.zeros((), jnp.float32)
    if config.adaptive:
      fraction = total['below'] / m
      new_c = c * jnp.exp(-config.clip_learning_rate *
                          (fraction - config.target_quantile))
    metrics = {
        'dp_clip_norm': c,
        'dp_noise_std': jnp.asarray(config.update_noise_multiplier, jnp.float32)
                        * c / m,
        'dp_unclipped_fraction': fraction,
        'num_included': jnp.sum(submitted).astype(jnp.float32),
        'secagg_late_dropouts': jnp.sum(inc & ~submitted).astype(jnp.float32),
    }
    return agg, privacy.DPState(clip_norm=new_c), metrics

  return privacy.DPAggregator(init=init, aggregate=aggregate)
