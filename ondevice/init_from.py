"""Start a run from another run's checkpoint: `config.init`.

Any binary can begin from the parameters (and model state) that another run
saved: a centrally pre-trained model, a meta-learned initialisation, a
federated server model. `config.init` names that run's work directory (or
its `checkpoints/` folder); the newest checkpoint that passes its checksum is
read without knowing which kind of run wrote it, its `params` (and
`model_state`) are taken, and they must match the model this run builds
leaf for leaf, or the error lists what differs.

    params, model_state = init_from.maybe_load(config, params, model_state)

Checkpoints are found as `<dir>/checkpoints/<step>` with the sidecar that
`ondevice.checkpoint` writes; the run states of every loop in this project
(`TrainState`, `ServerState`, `MetaState`, ...) keep their parameters under
`params` and their batch statistics under `model_state`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from ondevice import checkpoint as checkpoint_lib
from ondevice import train

PyTree = Any


def _checkpoints_dir(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  inner = os.path.join(path, 'checkpoints')
  return inner if os.path.isdir(inner) else path


def checkpoint_steps(path: str) -> list[int]:
  """Steps saved under `path` (a work directory or its checkpoints/)."""
  folder = _checkpoints_dir(path)
  if not os.path.isdir(folder):
    return []
  return sorted((int(n) for n in os.listdir(folder) if n.isdigit()),
                reverse=True)


def validate(config) -> None:
  """`config.init`, when set, names a directory holding checkpoints."""
  path = config.get('init', '') or ''
  if path and not checkpoint_steps(path):
    raise ValueError(
        f'config.init={path!r} holds no checkpoint (looked for '
        f'{_checkpoints_dir(path)}/<step>); pass the work directory of a '
        'finished run, or leave config.init empty to start from the seed.')


def _canonical(keystr: str) -> str:
  """Attribute and key paths alike: ".params['a']" -> "['params']['a']"."""
  return re.sub(r'\.(\w+)', r"['\1']", keystr)


def _verified(raw: PyTree, sidecar: dict[str, Any]) -> None:
  """Recomputes the sidecar's checksum over `raw` in the saved order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(raw)
  by_path = {_canonical(jax.tree_util.keystr(p)): leaf for p, leaf in flat}
  digest = hashlib.sha256()
  for path, _, _ in sidecar['leaves']:
    array = by_path.get(_canonical(path))
    if array is None:
      raise checkpoint_lib.CorruptCheckpointError(f'leaf {path} is missing')
    array = np.ascontiguousarray(np.asarray(array))
    digest.update(f'{path}|{array.dtype.str}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  if 'sha256:' + digest.hexdigest() != sidecar['checksum']:
    raise checkpoint_lib.CorruptCheckpointError('its checksum does not match')


def _read(folder: str, step: int) -> PyTree:
  with open(os.path.join(folder, str(step), checkpoint_lib.SIDECAR)) as f:
    sidecar = json.load(f)
  with ocp.CheckpointManager(folder) as manager:
    raw = manager.restore(step, args=ocp.args.StandardRestore())
  _verified(raw, sidecar)
  return raw


def _find_state(raw: PyTree) -> dict[str, Any]:
  """The mapping that holds 'params' (the run state), at depth 0 or 1."""
  if isinstance(raw, dict) and 'params' in raw:
    return raw
  for value in (raw.values() if isinstance(raw, dict) else ()):
    if isinstance(value, dict) and 'params' in value:
      return value
  raise ValueError('The checkpoint holds no params (saved keys: '
                   f'{sorted(raw) if isinstance(raw, dict) else type(raw)}).')


def _check_like(what: str, loaded: PyTree, like: PyTree, path: str) -> None:
  got = {k: np.shape(v) for k, v in train.flatten_params(loaded).items()}
  want = {k: np.shape(v) for k, v in train.flatten_params(like).items()}
  problems = [f'only in the checkpoint: {sorted(set(got) - set(want))[:8]}'
              ] if set(got) - set(want) else []
  if set(want) - set(got):
    problems.append(f'only in this model: {sorted(set(want) - set(got))[:8]}')
  problems += [f'{k}: checkpoint {got[k]}, model {want[k]}'
               for k in sorted(set(got) & set(want)) if got[k] != want[k]][:8]
  if problems:
    raise ValueError(f'config.init={path!r}: its {what} do not match the '
                     'model this run builds (another model, width or number '
                     'of classes?): ' + '; '.join(problems))


def load(path: str, params: PyTree, model_state: PyTree
         ) -> tuple[PyTree, PyTree, int]:
  """(params, model_state, step) from the newest good checkpoint at `path`.

  `params` and `model_state` are this run's freshly initialised ones: the
  loaded trees must match them, and take their dtypes.
  """
  folder, problems = _checkpoints_dir(path), []
  for step in checkpoint_steps(path):
    try:
      state = _find_state(_read(folder, step))
    except (checkpoint_lib.CorruptCheckpointError, OSError,
            ValueError) as e:
      logging.error('config.init: checkpoint %d in %s is unusable (%s).',
                    step, folder, e)
      problems.append(f'step {step}: {e}')
      continue
    loaded_state = state.get('model_state', {}) or {}
    _check_like('params', state['params'], params, path)
    _check_like('model state', loaded_state, model_state or {}, path)
    cast = lambda new, old: np.asarray(new).astype(np.asarray(old).dtype)
    return (jax.tree.map(cast, state['params'], params),
            jax.tree.map(cast, loaded_state, dict(model_state or {})), step)
  raise ValueError(f'config.init={path!r}: no usable checkpoint: {problems}')


def maybe_load(config, params: PyTree, model_state: PyTree
               ) -> tuple[PyTree, PyTree]:
  """`load(config.init, ...)` when config.init is set, else the arguments."""
  path = config.get('init', '') or ''
  if not path:
    return params, model_state
  params, model_state, step = load(path, params, model_state)
  logging.info('Initialised from %s (checkpoint %d).', path, step)
  return params, model_state
