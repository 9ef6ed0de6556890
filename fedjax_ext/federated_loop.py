"""The per-round step that `ondevice.loop.run_loop` drives in a federated run.

    step = federated_loop.make_round_step(algorithm, train_ds, pool, config,
                                          round_key)
    result = loop.run_loop(algorithm.init(params, model_state), step,
                           loop.Schedule(num_steps=config.num_rounds, ...),
                           workdir=workdir, unit='round',
                           counters=federated_loop.COUNTERS)

Round r samples its cohort, gathers the clients' examples and applies the
algorithm with keys derived from `fold_in(round_key, r)` only, so a resumed run
draws the same cohorts and keys as an uninterrupted one. The federated binary
(`fedjax_ext.experiment`) and FedUV's federated variants both build their
rounds here.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from fedjax_ext import algorithms
from fedjax_ext import cohort as cohort_lib
from ondevice.data.base import ArrayDataset

PyTree = Any
RoundStep = Callable[[PyTree, int], tuple[PyTree, dict[str, jax.Array]]]

# Round metrics that are totals over a run (checkpointed by the loop, so a
# resumed run reports the same totals as an uninterrupted one).
COUNTERS = ('num_nonfinite_clients', 'num_dropped')


def round_keys(round_key: jax.Array, r: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sample, gather, apply) keys of round `r`: a function of r alone."""
  sample_key, gather_key, apply_key = jax.random.split(
      jax.random.fold_in(round_key, r), 3)
  return sample_key, gather_key, apply_key


def make_round_step(algorithm: algorithms.FederatedAlgorithm,
                    train_ds: ArrayDataset, pool: cohort_lib.ClientPool,
                    config: ml_collections.ConfigDict,
                    round_key: jax.Array) -> RoundStep:
  """`step(state, r) -> (state, metrics)`: round r of `algorithm`.

  Signature: make_round_step(algorithm: FederatedAlgorithm,
  train_ds: ArrayDataset, pool: ClientPool, config: ConfigDict,
  round_key: jax.Array) -> Callable[[state, int], (state, metrics)].

  Args:
    algorithm: an `(init, apply)` pair from `fedjax_ext.algorithms` (e.g.
      from `training.build_algorithm`).
    train_ds: the training examples; `pool` groups them by client.
    pool: `cohort_lib.ClientPool.from_dataset(train_ds)`.
    config: reads `cohort_size`, `max_examples_per_client` and
      `weighted_sampling` (False when absent).
    round_key: the run's round key; round r uses `fold_in(round_key, r)`.

  Returns:
    The step. Its metrics are `algorithm.apply`'s round metrics (device
    scalars, see `rounds.run_round`), which include the `COUNTERS`.
  """
  cohort_size = int(config.cohort_size)
  max_examples = int(config.max_examples_per_client)
  weighted = bool(config.get('weighted_sampling', False))
  if cohort_size > pool.num_clients:
    raise ValueError(f'config.cohort_size={cohort_size} exceeds the '
                     f'{pool.num_clients} training clients with data; lower '
                     'it or use more clients.')

  def step(state, r: int):
    sample_key, gather_key, apply_key = round_keys(round_key, r)
    ids = cohort_lib.sample_clients(sample_key, pool.sizes, cohort_size,
                                    weighted=weighted)
    cohort = cohort_lib.gather_cohort(train_ds, ids, max_examples,
                                      gather_key, pool)
    return algorithm.apply(state, cohort, ids, apply_key)

  return step
