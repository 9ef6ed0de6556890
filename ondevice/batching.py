"""Host-side minibatches: the example indices of step `t` of a training run.

Every training loop that draws minibatches from an in-memory dataset uses
`EpochBatches`: the examples are visited in a fresh random order each epoch,
the order of epoch `e` is `jax.random.permutation(fold_in(key, e), n)`, and
the indices of a step are a function of `(key, step)` alone. A run resumed
from a checkpoint at step `t` therefore draws exactly the batches an
uninterrupted run draws from step `t` on; nothing about the order is state.

    batches = batching.EpochBatches(data_key, len(train_ds), batch_size=64)
    for step in range(start, num_steps):
      idx = batches.indices(step)                    # int array, (64,)
      batch = batches.batch(step, train_ds.x, train_ds.y)
      # {'x': x[idx], 'y': y[idx], 'mask': ones(64, float32)}

API:
  `EpochBatches(key, num_examples, batch_size, *, drop_remainder=True)`:
    `key`: a JAX PRNG key (a typed key or a raw uint32 key) or an int seed.
    `drop_remainder=True`: an epoch is `num_examples // batch_size` steps,
      each a disjoint slice of the epoch's permutation; the last
      `num_examples % batch_size` examples of each permutation are not used
      that epoch. Needs `batch_size <= num_examples`.
    `drop_remainder=False`: the epochs' permutations are laid end to end and
      step `t` takes positions `[t * batch_size, (t + 1) * batch_size)` of
      that stream, so every example is seen once per epoch, a batch may span
      two epochs, and `batch_size` may exceed `num_examples` (small
      enrollment sets).
  `.indices(step) -> np.ndarray` (integers, shape `(batch_size,)`); also
    `__call__(step)`.
  `.batch(step, x, y) -> {'x', 'y', 'mask'}`: the rows of `x` and `y` at
    those indices and a float32 mask of ones (the train step's batch form).
  `.steps_per_epoch`: `num_examples // batch_size` when dropping the
    remainder, else `num_examples / batch_size` (a float).
  `epoch_permutation(key, epoch, num_examples) -> np.ndarray`: the order of
    one epoch, the reference the class slices.
"""
from __future__ import annotations

import functools

import jax
import numpy as np


@functools.partial(jax.jit, static_argnums=1)
def _permutation(key: jax.Array, num_examples: int) -> jax.Array:
  return jax.random.permutation(key, num_examples)


def _as_key(key) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  return key


def epoch_permutation(key, epoch: int, num_examples: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples."""
  return np.asarray(_permutation(jax.random.fold_in(_as_key(key), epoch),
                                 num_examples))


class EpochBatches:
  """The minibatch indices of each step; see the module docstring."""

  def __init__(self, key, num_examples: int, batch_size: int, *,
               drop_remainder: bool = True):
    if num_examples <= 0:
      raise ValueError(f'Cannot batch {num_examples} examples; the dataset '
                       'is empty.')
    if batch_size <= 0:
      raise ValueError(f'batch_size must be > 0; got {batch_size}.')
    if drop_remainder and batch_size > num_examples:
      raise ValueError(
          f'batch_size={batch_size} is larger than the {num_examples} '
          'examples; lower it or use drop_remainder=False.')
    self._key = _as_key(key)
    self._n = int(num_examples)
    self._batch = int(batch_size)
    self._drop = drop_remainder
    self._cache: dict[int, np.ndarray] = {}

  @property
  def steps_per_epoch(self) -> int | float:
    if self._drop:
      return self._n // self._batch
    return self._n / self._batch

  def _epoch(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:
      # Steps advance through epochs in order: keep the few in use.
      for old in [e for e in self._cache if e < epoch - 1]:
        del self._cache[old]
      self._cache[epoch] = epoch_permutation(self._key, epoch, self._n)
    return self._cache[epoch]

  def indices(self, step: int) -> np.ndarray:
    """The example indices of step `step` (counted from 0)."""
    if step < 0:
      raise ValueError(f'step must be >= 0; got {step}.')
    if self._drop:
      epoch, offset = divmod(step, self._n // self._batch)
      start = offset * self._batch
      return self._epoch(epoch)[start:start + self._batch]
    first = step * self._batch
    last = first + self._batch  # Exclusive.
    parts = []
    for epoch in range(first // self._n, (last - 1) // self._n + 1):
      lo = max(first - epoch * self._n, 0)
      hi = min(last - epoch * self._n, self._n)
      parts.append(self._epoch(epoch)[lo:hi])
    return np.concatenate(parts)

  __call__ = indices

  def batch(self, step: int, x: np.ndarray, y: np.ndarray
            ) -> dict[str, np.ndarray]:
    """`{'x', 'y', 'mask'}` of step `step`, gathered on the host."""
    idx = self.indices(step)
    return {'x': x[idx], 'y': y[idx],
            'mask': np.ones(len(idx), np.float32)}
