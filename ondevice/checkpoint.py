"""Orbax checkpoints of any PyTree (train state, server state, PRNG keys).

A run saves everything its future depends on: the state, and the PRNG key the
run derives its per-step keys from. Resuming then reproduces an uninterrupted
run bit for bit, because every per-step key is `fold_in(key, step)`.

Orbax writes into a temporary folder and renames it when complete, so a run
killed mid-save never leaves a half-written checkpoint behind as the latest.
Files can still rot or be cut short afterwards, and a flipped bit in an array
would restore without complaint. So each checkpoint also gets a sidecar,
`<step>/integrity.json`, written after orbax finishes: a SHA-256 over every
leaf's path, dtype, shape and bytes, each leaf's shape and dtype (to name what
differs when a checkpoint does not fit the run), and the config the run was
written under. `restore_latest` trusts a checkpoint only when its sidecar is
there and the restored bytes hash to it, and otherwise falls back to the one
before, which is why at least two checkpoints are kept.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging as std_logging
import os
import sys
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from ondevice import workdir as workdir_lib

PyTree = Any

SIDECAR = 'integrity.json'
_FORMAT = 1


class CorruptCheckpointError(ValueError):
  """A checkpoint that cannot be read back as it was saved."""


class Checkpointer:
  """Saves and restores PyTrees under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, max_to_keep: int = 2, config: Any = None):
    """Opens (creating) `<workdir>/checkpoints`.

    Args:
      workdir: the run's output directory.
      max_to_keep: checkpoints kept; at least 2, so a corrupt latest one has
        a predecessor to fall back to.
      config: the run's config, recorded in every checkpoint's sidecar.
    """
    if max_to_keep < 2:
      raise ValueError(
          f'max_to_keep={max_to_keep}; keep at least 2 checkpoints so a '
          'corrupt latest one can fall back to the previous one.')
    self._dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._config = workdir_lib.config_to_json(config)
    self._manager = ocp.CheckpointManager(
        self._dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  @property
  def directory(self) -> str:
    return self._dir

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: PyTree) -> None:
    """Saves `tree` as checkpoint `step` with its sidecar; waits for both.

    Checkpoints at `step` or later are deleted first: they belong to a run
    that was resumed from an earlier step (for example past a corrupt
    checkpoint) and this save supersedes them.
    """
    tree = jax.tree.map(_to_savable, tree)
    sidecar = _seal({'format': _FORMAT, 'step': int(step),
                     'checksum': checksum(tree),
                     'leaves': [list(s) for s in leaf_specs(tree)],
                     'config': self._config})
    for old in self._manager.all_steps():
      if old >= step:
        logging.warning('Replacing checkpoint %d in %s: the run resumed from '
                        'an earlier step.', old, self._dir)
        self._manager.delete(old)
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()
    if jax.process_index() == 0:  # One writer, as for orbax's own metadata.
      workdir_lib.write_json_atomic(self._sidecar_path(step), sidecar)
    logging.info('Saved checkpoint %d to %s', step, self._dir)

  def restore(self, step: int, target: PyTree) -> PyTree:
    """Restores checkpoint `step` into the structure and dtypes of `target`.

    A checkpoint with a sidecar is verified against it; one without (written
    before sidecars existed) is restored unverified, with a warning.

    Raises:
      ValueError: the checkpoint does not match `target` (naming a leaf and
        both shapes or dtypes), or it is corrupt.
    """
    try:
      return self._restore_checked(step, target, require_sidecar=False)
    except CorruptCheckpointError as e:
      raise ValueError(f'Checkpoint {step} in {self._dir} is unusable: {e}') \
          from e

  def restore_latest(self, target: PyTree) -> tuple[int, PyTree] | None:
    """Restores the newest good checkpoint into the structure of `target`.

    Walks the kept checkpoints newest first. One that cannot be read, lacks
    its sidecar or fails its checksum is logged as an error and the previous
    one is tried.

    Returns:
      (step, tree), or None when the directory holds no checkpoint at all.

    Raises:
      ValueError: checkpoints exist but none is good (the run must not
        silently start from scratch), or the newest readable one does not
        match `target`'s structure.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    problems = []
    for step in steps:
      try:
        return step, self._restore_checked(step, target, require_sidecar=True)
      except CorruptCheckpointError as e:
        logging.error('Checkpoint %d in %s is unusable (%s); trying the '
                      'previous one.', step, self._dir, e)
        problems.append(f'step {step}: {e}')
    raise ValueError(
        f'No usable checkpoint in {self._dir}:\n  ' + '\n  '.join(problems) +
        '\nMove the directory away (or pass another --workdir) to start from '
        'scratch.')

  def saved_config(self, step: int) -> Any:
    """The config recorded with checkpoint `step` (None if none was given).

    Raises:
      CorruptCheckpointError: the sidecar is missing or garbled.
    """
    return self._read_sidecar(step).get('config')

  def close(self) -> None:
    self._manager.close()

  def _sidecar_path(self, step: int) -> str:
    return os.path.join(self._dir, str(step), SIDECAR)

  def _read_sidecar(self, step: int) -> dict[str, Any]:
    path = self._sidecar_path(step)
    if not os.path.exists(path):
      raise CorruptCheckpointError(
          f'it has no {SIDECAR} (the save was interrupted, or it was written '
          'before checksums were recorded)')
    try:
      with open(path) as f:
        sidecar = json.load(f)
    except (OSError, ValueError) as e:
      raise CorruptCheckpointError(f'its {SIDECAR} is unreadable: {e!r}') \
          from e
    if not isinstance(sidecar, dict) or _seal(sidecar) != sidecar:
      raise CorruptCheckpointError(f'its {SIDECAR} is garbled (its own '
                                   'checksum does not match)')
    return sidecar

  def _restore_checked(self, step: int, target: PyTree,
                       require_sidecar: bool) -> PyTree:
    """Restores `step` and verifies it; CorruptCheckpointError if it fails."""
    savable = jax.tree.map(_to_savable, target)
    sidecar = None
    if require_sidecar or os.path.exists(self._sidecar_path(step)):
      sidecar = self._read_sidecar(step)
      check_structure(step, [tuple(s) for s in sidecar['leaves']],
                      leaf_specs(savable))
    else:
      logging.warning('Checkpoint %d in %s has no %s; restoring it without '
                      'verification.', step, self._dir, SIDECAR)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)),
        savable)
    restored = self._orbax_restore(step, abstract, sidecar is None)
    if sidecar is not None and checksum(restored) != sidecar['checksum']:
      raise CorruptCheckpointError(
          'its arrays do not match the checksum recorded when it was saved '
          '(the files changed on disk)')
    return jax.tree.map(_from_savable, restored, target)

  def _orbax_restore(self, step: int, abstract: PyTree,
                     unverified: bool) -> PyTree:
    """Orbax's restore, with every failure as CorruptCheckpointError."""
    with _quiet_abandoned_reads():
      try:
        return self._manager.restore(step,
                                     args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many kinds of errors on damaged files;
        # KeyboardInterrupt and SystemExit are not Exceptions and pass on.
        # Only the text is kept: the traceback holds orbax's abandoned reads,
        # which must be collected here, while their noise is filtered.
        kind, text = type(e).__name__, str(e)
        mismatch = isinstance(e, (ValueError, KeyError, TypeError))
      _collect_abandoned_reads()
    if unverified and mismatch:
      raise ValueError(
          f'Checkpoint {step} in {self._dir} cannot be restored into this '
          f'run\'s state (was it written by another config?): {text}')
    raise CorruptCheckpointError(
        f'orbax could not read it: {kind}: {_first_line(text)}')


def _seal(sidecar: dict[str, Any]) -> dict[str, Any]:
  """`sidecar` with 'sidecar_sha256' over the rest, so that a garbled
  sidecar that still parses as JSON is caught too."""
  body = {k: v for k, v in sidecar.items() if k != 'sidecar_sha256'}
  text = json.dumps(body, sort_keys=True, allow_nan=False)
  return {**body, 'sidecar_sha256': hashlib.sha256(text.encode()).hexdigest()}


def leaf_specs(tree: PyTree) -> list[tuple[str, list[int], str]]:
  """(path, shape, dtype) of every leaf, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), [int(d) for d in np.shape(leaf)],
           str(_dtype(leaf))) for path, leaf in flat]


def _dtype(leaf) -> np.dtype:
  # Arrays answer without a copy to the host; Python scalars via NumPy.
  return np.dtype(leaf.dtype) if hasattr(leaf, 'dtype') else \
      np.asarray(leaf).dtype


def checksum(tree: PyTree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in flat:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(
        f'{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}|'
        .encode())
    digest.update(array.tobytes())
  return 'sha256:' + digest.hexdigest()


def check_structure(step: int, saved: list[tuple[str, list[int], str]],
                    wanted: list[tuple[str, list[int], str]]) -> None:
  """Raises a ValueError naming the first leaf where checkpoint and run differ.
  """
  saved_by_path = {p: (list(s), d) for p, s, d in saved}
  wanted_by_path = {p: (list(s), d) for p, s, d in wanted}
  hint = ('; was it written by another model, optimiser or config? Use '
          'another --workdir for this run.')
  only_saved = [p for p in saved_by_path if p not in wanted_by_path]
  only_wanted = [p for p in wanted_by_path if p not in saved_by_path]
  if only_saved or only_wanted:
    raise ValueError(
        f'Checkpoint {step} does not match this run\'s state: leaves only in '
        f'the checkpoint {only_saved[:5]}, only in the run {only_wanted[:5]}'
        + hint)
  for path, (shape, dtype) in wanted_by_path.items():
    saved_shape, saved_dtype = saved_by_path[path]
    if saved_shape != shape or saved_dtype != dtype:
      raise ValueError(
          f'Checkpoint {step} does not match this run\'s state at leaf '
          f'{path}: checkpoint {tuple(saved_shape)} {saved_dtype}, run '
          f'{tuple(shape)} {dtype}' + hint)


def _first_line(text: str) -> str:
  lines = text.strip().splitlines()
  return lines[0][:300] if lines else '(no message)'


class _DropAbandonedReadNoise(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


def _drop_closed_loop_noise(previous):
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)
  return hook


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """Keeps the reads a failed restore abandoned from printing tracebacks.

  When one array of a damaged checkpoint fails to read, orbax gives up on
  the others and closes its event loop while tensorstore still completes
  them; their callbacks then print 'Task exception was never retrieved' and
  'Event loop is closed', which look like a crash although the fallback to
  the previous checkpoint works.
  """
  asyncio_logger = std_logging.getLogger('asyncio')
  noise = _DropAbandonedReadNoise()
  previous_hook = sys.unraisablehook
  asyncio_logger.addFilter(noise)
  sys.unraisablehook = _drop_closed_loop_noise(previous_hook)
  try:
    yield
  finally:
    sys.unraisablehook = previous_hook
    asyncio_logger.removeFilter(noise)


def _collect_abandoned_reads(wait_s: float = 0.2) -> None:
  """Lets late read callbacks land and their tasks be collected now."""
  gc.collect()
  time.sleep(wait_s)
  gc.collect()


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
