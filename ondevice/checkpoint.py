"""Orbax checkpoints of any PyTree (train state, server state, PRNG keys).

A run saves everything its future depends on: the state, and the PRNG key the
run derives its per-step keys from. Resuming then reproduces an uninterrupted
run bit for bit, because every per-step key is `fold_in(key, step)`.

Orbax writes into a temporary folder and renames it when complete, so a run
killed mid-save never leaves a half-written checkpoint behind as the latest.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """Saves and restores PyTrees under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self._dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._manager = ocp.CheckpointManager(
        self._dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  @property
  def directory(self) -> str:
    return self._dir

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: PyTree) -> None:
    """Saves `tree` as checkpoint `step` and waits until it is on disk."""
    tree = jax.tree.map(_to_savable, tree)
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()
    logging.info('Saved checkpoint %d to %s', step, self._dir)

  def restore(self, step: int, target: PyTree) -> PyTree:
    """Restores checkpoint `step` into the structure and dtypes of `target`.

    Raises:
      ValueError: when the checkpoint does not match `target` (different
        model or optimiser), naming the checkpoint directory.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(_to_savable(x)),
                                       np.asarray(_to_savable(x)).dtype),
        target)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f'Checkpoint {step} in {self._dir} does not match this run\'s '
          f'state (was it written by another config?): {e}') from e
    return jax.tree.map(_from_savable, restored, target)

  def close(self) -> None:
    self._manager.close()


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _to_savable(x):
  # Typed PRNG keys are saved as their raw uint32 data.
  return jax.random.key_data(x) if _is_key(x) else x


def _from_savable(x, like):
  if _is_key(like):
    return jax.random.wrap_key_data(x, impl=jax.random.key_impl(like))
  return x
