"""User-level differential privacy for federated rounds (DP-FedAvg).

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"): every client's update is clipped to L2 norm C, the server
averages with the fixed-denominator estimator

    aggregate = sum_i clip(delta_i, C) / m  +  N(0, (z * C / m)^2 I),

where m is the *expected* cohort size (so a dropped client changes the sum,
never the sensitivity), and each included client counts once: example-count
weights would raise the sensitivity and are deliberately ignored.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"): C follows the target quantile gamma of update norms by the
geometric rule C <- C * exp(-eta * (b - gamma)), where b is the noised fraction
of clients whose norm was <= C, released with Gaussian noise of std sigma_b on
the count. The update noise is then raised from z to
z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) so that the pair of releases together
is a Gaussian mechanism with noise multiplier z (their Theorem 1), which is the
value to account.

Accounting uses Google's `dp-accounting` package (RDP or PLD accountant) for the
sampled Gaussian mechanism composed over the rounds. A federated run draws
fixed-size cohorts uniformly without replacement, so it accounts with
`epsilon_curve` (the sampled-without-replacement event, replace-one
neighbours).

What is released: in a DP run (`training.rounds_config`) the model-state
change of each client (batch-norm statistics) is clipped and noised together
with its update, so the server holds no statistic averaged in the clear.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_ext import aggregators

PyTree = Any


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """DP-FedAvg settings, validated on construction.

  Attributes:
    noise_multiplier: z, noise std over sensitivity for the whole round
      (update and, when adaptive, the clipped count together); >= 0.
    clip_norm: C, the L2 clip (the initial one when adaptive); > 0.
    expected_num_clients: m, the fixed denominator (expected cohort size).
    adaptive: whether C follows `target_quantile` of update norms.
    target_quantile: gamma in (0, 1); Andrew et al. use 0.5.
    clip_learning_rate: eta > 0 of the geometric clip update.
    clipped_count_stddev: sigma_b >= 0, noise std on the count of clients
      under the clip; None means m / 20 (Andrew et al.'s choice).
  """
  noise_multiplier: float
  clip_norm: float
  expected_num_clients: int
  adaptive: bool = False
  target_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  clipped_count_stddev: float | None = None

  def __post_init__(self):
    def bad(field, rule):
      raise ValueError(f'DPConfig.{field} {rule}; got '
                       f'{getattr(self, field)!r}.')

    if not _is_real(self.noise_multiplier) or not self.noise_multiplier >= 0:
      bad('noise_multiplier', 'must be >= 0 (0 turns the noise off)')
    if not _is_real(self.clip_norm) or not self.clip_norm > 0:
      bad('clip_norm', 'must be > 0 (an L2 bound on each client update)')
    m = self.expected_num_clients
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
      bad('expected_num_clients', 'must be an integer >= 1 (the cohort size)')
    if not _is_real(self.target_quantile) or not 0 < self.target_quantile < 1:
      bad('target_quantile', 'must lie strictly inside (0, 1)')
    if (not _is_real(self.clip_learning_rate) or
        not self.clip_learning_rate > 0):
      bad('clip_learning_rate', 'must be > 0')
    sb = self.clipped_count_stddev
    if sb is not None and (not _is_real(sb) or not sb >= 0):
      bad('clipped_count_stddev', 'must be >= 0, or None for m / 20')
    if (self.adaptive and self.noise_multiplier > 0 and
        not 2 * self.count_stddev > self.noise_multiplier):
      raise ValueError(
          'DPConfig.clipped_count_stddev is too small for adaptive clipping: '
          f'need 2 * sigma_b > noise_multiplier, got 2 * {self.count_stddev} '
          f'<= {self.noise_multiplier}. Raise clipped_count_stddev (or leave '
          'it None for m / 20) or raise expected_num_clients.')

  @property
  def count_stddev(self) -> float:
    """sigma_b actually used (m / 20 when `clipped_count_stddev` is None)."""
    if self.clipped_count_stddev is None:
      return self.expected_num_clients / 20.0
    return float(self.clipped_count_stddev)

  @property
  def update_noise_multiplier(self) -> float:
    """z_delta: the multiplier applied to the update's noise."""
    z = float(self.noise_multiplier)
    if not self.adaptive or z == 0:
      return z
    return (z ** -2 - (2 * self.count_stddev) ** -2) ** -0.5


def _is_real(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


class DPState(NamedTuple):
  """Carried across rounds; only the (adaptive) clip norm."""
  clip_norm: jax.Array


class DPAggregator(NamedTuple):
  """`init() -> DPState`; `aggregate(state, stacked, weights, key) ->
  (aggregate, new_state, metrics)`."""
  init: Callable[[], DPState]
  aggregate: Callable[..., tuple[PyTree, DPState, dict[str, jax.Array]]]


def clip_by_norm(delta: PyTree, clip_norm) -> tuple[PyTree, jax.Array]:
  """Scales `delta` to global L2 norm <= clip_norm; returns it and its norm."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(delta)))
  factor = clip_norm / jnp.maximum(norm, clip_norm)  # 1 when norm <= clip.
  clipped = jax.tree.map(lambda x: (x * factor).astype(x.dtype), delta)
  return clipped, norm


def clip(norm: float):
  """Per-client transform `(delta, key) -> (clipped, info)` with a fixed norm.

  info: 'update_norm' (before clipping) and 'was_clipped' (1.0 or 0.0).
  """
  if not _is_real(norm) or not norm > 0:
    raise ValueError(f'clip(norm={norm!r}): norm must be > 0.')

  def transform(delta, key):
    del key  # Deterministic.
    clipped, before = clip_by_norm(delta, norm)
    return clipped, {'update_norm': before,
                     'was_clipped': (before > norm).astype(jnp.float32)}

  return transform


def _zero_unless(inc: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.where(inc.reshape(inc.shape + (1,) * (x.ndim - 1)), x, 0)


def _gaussian_like(tree: PyTree, key: jax.Array, std) -> PyTree:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  noised = [(x + std * jax.random.normal(k, x.shape)).astype(x.dtype)
            for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, noised)


def dp_aggregator(config: DPConfig) -> DPAggregator:
  """DP-FedAvg with fixed or adaptive clipping, as an (init, aggregate) pair.

  `aggregate(state, stacked_deltas, weights, key)` clips every client (a
  client already clipped to the same norm is unchanged), sums the included
  ones (weight > 0 and finite), divides by `expected_num_clients`, adds the
  Gaussian noise and, when adaptive, moves the clip norm. Jittable.
  """
  if not isinstance(config, DPConfig):
    raise ValueError(f'dp_aggregator needs a DPConfig; got {type(config)}.')
  m = float(config.expected_num_clients)
  z_update = config.update_noise_multiplier
  sigma_b = config.count_stddev
  gamma = float(config.target_quantile)
  eta = float(config.clip_learning_rate)

  def init() -> DPState:
    return DPState(clip_norm=jnp.asarray(config.clip_norm, jnp.float32))

  def aggregate(state, stacked, weights, key):
    inc = aggregators.included_mask(stacked, weights)
    c = state.clip_norm
    clipped, norms = jax.vmap(clip_by_norm, in_axes=(0, None))(stacked, c)
    total = jax.tree.map(lambda x: jnp.sum(_zero_unless(inc, x), axis=0),
                         clipped)
    noise_key, count_key = jax.random.split(key)
    noise_std = z_update * c / m
    agg = _gaussian_like(jax.tree.map(lambda x: x / m, total), noise_key,
                         noise_std)
    below = jnp.sum(inc & (norms <= c)).astype(jnp.float32)
    noisy_fraction = (below + sigma_b * jax.random.normal(count_key)) / m
    if config.adaptive:
      new_c = c * jnp.exp(-eta * (noisy_fraction - gamma))
    else:
      new_c = c
    metrics = {
        'dp_clip_norm': c,
        'dp_noise_std': jnp.asarray(noise_std, jnp.float32),
        'dp_unclipped_fraction': noisy_fraction,
        'num_included': jnp.sum(inc).astype(jnp.float32),
    }
    return agg, DPState(clip_norm=new_c), metrics

  return DPAggregator(init=init, aggregate=aggregate)


def dp_mean_aggregator(config: DPConfig) -> aggregators.Aggregator:
  """Fixed-clip DP-FedAvg in the stateless aggregator hook shape.

  `aggregator(stacked_deltas, weights, key) -> (aggregate, metrics)`. Adaptive
  clipping carries state, so it needs `dp_aggregator`.
  """
  if config.adaptive:
    raise ValueError('dp_mean_aggregator has no state to carry the adaptive '
                     'clip norm; use dp_aggregator(config) (init, aggregate) '
                     'or set DPConfig.adaptive=False.')
  dp = dp_aggregator(config)
  state = dp.init()

  def aggregate(stacked, weights, key):
    agg, _, metrics = dp.aggregate(state, stacked, weights, key)
    return agg, metrics

  return aggregate


ACCOUNTANTS = ('rdp', 'pld')
SAMPLINGS = ('poisson', 'without_replacement')


def compute_epsilon(noise_multiplier: float, sampling_rate: float,
                    rounds: int, delta: float, *, accountant: str = 'rdp',
                    sampling: str = 'poisson',
                    population_size: int | None = None) -> float:
  """Epsilon of the sampled Gaussian mechanism composed over `rounds`.

  Args:
    noise_multiplier: z of the whole round (DPConfig.noise_multiplier).
    sampling_rate: q = cohort size / population size, in (0, 1].
    rounds: number of rounds T >= 0.
    delta: target delta in (0, 1).
    accountant: 'rdp' (Mironov 2017) or 'pld' (privacy loss distributions;
      tighter, slower).
    sampling: 'poisson' (each client joins with probability q; add/remove
      neighbours) or 'without_replacement' (a fixed cohort of
      round(q * population_size) clients; replace-one neighbours; RDP only).
    population_size: required for 'without_replacement'.

  Returns:
    epsilon (inf when noise_multiplier is 0 and rounds > 0).
  """
  _check_epsilon_args(noise_multiplier, sampling_rate, rounds, delta,
                      accountant, sampling, population_size)
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  event, neighbours = dp_event(noise_multiplier, sampling_rate, sampling,
                               population_size)
  return _epsilon_of(event, int(rounds), neighbours, accountant, delta)


def _check_epsilon_args(noise_multiplier, sampling_rate, rounds, delta,
                        accountant, sampling, population_size) -> None:
  """Raises a ValueError naming the first argument `compute_epsilon` rejects."""
  if not _is_real(noise_multiplier) or not noise_multiplier >= 0:
    raise ValueError(f'noise_multiplier must be >= 0; got {noise_multiplier}.')
  if not _is_real(sampling_rate) or not 0 < sampling_rate <= 1:
    raise ValueError(f'sampling_rate must lie in (0, 1] (cohort / population);'
                     f' got {sampling_rate}.')
  if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
    raise ValueError(f'rounds must be an integer >= 0; got {rounds}.')
  if not _is_real(delta) or not 0 < delta < 1:
    raise ValueError(f'delta must lie in (0, 1), typically 1 / population; '
                     f'got {delta}.')
  if accountant not in ACCOUNTANTS:
    raise ValueError(f'accountant={accountant!r}; choose one of {ACCOUNTANTS}.')
  if sampling not in SAMPLINGS:
    raise ValueError(f'sampling={sampling!r}; choose one of {SAMPLINGS}.')
  if sampling == 'without_replacement':
    if accountant != 'rdp':
      raise ValueError("sampling='without_replacement' is only supported by "
                       "accountant='rdp' in dp-accounting.")
    if population_size is None or population_size < 1:
      raise ValueError("sampling='without_replacement' needs population_size "
                       f'>= 1; got {population_size}.')


def _dp_accounting():
  try:
    import dp_accounting  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('compute_epsilon needs the dp-accounting package: '
                      'pip install dp-accounting') from e
  return dp_accounting


def dp_event(noise_multiplier: float, sampling_rate: float, sampling: str,
             population_size: int | None = None):
  """One round's dp-accounting event and its neighbouring relation.

  'poisson': `PoissonSampledDpEvent(q, Gaussian(z))`, add/remove one;
  'without_replacement': `SampledWithoutReplacementDpEvent(N, round(q N),
  Gaussian(z))`, replace one (the cohort has a fixed size).
  """
  dp_accounting = _dp_accounting()
  gaussian = dp_accounting.GaussianDpEvent(float(noise_multiplier))
  relation = dp_accounting.NeighboringRelation
  if sampling == 'poisson':
    return (dp_accounting.PoissonSampledDpEvent(float(sampling_rate),
                                                gaussian),
            relation.ADD_OR_REMOVE_ONE)
  cohort = max(1, round(sampling_rate * population_size))
  return (dp_accounting.SampledWithoutReplacementDpEvent(
      int(population_size), int(cohort), gaussian), relation.REPLACE_ONE)


def _epsilon_of(event, rounds: int, neighbours, accountant: str,
                delta: float) -> float:
  """Epsilon at `delta` of `event` self-composed `rounds` times."""
  # pylint: disable=g-import-not-at-top
  from dp_accounting.pld import pld_privacy_accountant
  from dp_accounting.rdp import rdp_privacy_accountant
  # pylint: enable=g-import-not-at-top
  composed = _dp_accounting().SelfComposedDpEvent(event, rounds)
  if accountant == 'rdp':
    acct = rdp_privacy_accountant.RdpAccountant(neighboring_relation=neighbours)
  else:
    acct = pld_privacy_accountant.PLDAccountant(neighboring_relation=neighbours)
  acct.compose(composed)
  return float(acct.get_epsilon(float(delta)))


def epsilon_for_config(config: DPConfig, population_size: int, rounds: int,
                       delta: float, **kwargs) -> float:
  """`compute_epsilon` with q = expected_num_clients / population_size."""
  if population_size < config.expected_num_clients:
    raise ValueError(f'population_size={population_size} is smaller than '
                     'DPConfig.expected_num_clients='
                     f'{config.expected_num_clients}; a cohort cannot be '
                     'larger than the client pool.')
  q = config.expected_num_clients / population_size
  return compute_epsilon(config.noise_multiplier, q, rounds, delta,
                         population_size=population_size, **kwargs)


def epsilon_curve(noise_multiplier: float, cohort_size: int,
                  population_size: int, delta: float
                  ) -> Callable[[int], float]:
  """`rounds -> epsilon` of the rounds a federated run samples.

  Cohorts are `cohort_size` clients drawn uniformly without replacement from
  `population_size` (`cohort.sample_clients`), so each round is the
  sampled-without-replacement Gaussian event (`dp_event`) and the RDP
  accountant composes it: the value equals `compute_epsilon(...,
  sampling='without_replacement', population_size=population_size)`. The
  one-round RDP curve is computed once and scaled by the number of rounds
  (what dp-accounting's own self-composition does), so logging epsilon every
  round stays cheap. noise_multiplier 0 gives inf for rounds > 0.
  """
  _check_epsilon_args(noise_multiplier, cohort_size / population_size, 0,
                      delta, 'rdp', 'without_replacement', population_size)
  if noise_multiplier == 0:
    return lambda rounds: 0.0 if rounds == 0 else math.inf
  # pylint: disable=g-import-not-at-top
  from dp_accounting.rdp import rdp_privacy_accountant
  # pylint: enable=g-import-not-at-top
  event, neighbours = dp_event(noise_multiplier,
                               cohort_size / population_size,
                               'without_replacement', population_size)
  acct = rdp_privacy_accountant.RdpAccountant(neighboring_relation=neighbours)
  acct.compose(event)
  # The accountant's orders and one-round RDP values (no public getter).
  orders, one_round = acct._orders, acct._rdp  # pylint: disable=protected-access

  def epsilon(rounds: int) -> float:
    if rounds == 0:
      return 0.0
    eps, _ = rdp_privacy_accountant.compute_epsilon(
        orders, one_round * int(rounds), float(delta))
    return float(eps)

  return epsilon
