"""One run per work directory, under one config.

`claim(workdir, config)` is what every binary holds for the whole run:

- an exclusive `fcntl.flock` on `<workdir>/.lock`, so a second run started on
  the same directory is refused instead of writing every metric twice. The
  kernel drops the lock when its holder exits, however it exits, so a killed
  run never leaves the directory stuck. The holder's pid is written into the
  lock file to name it in the refusal.
- `<workdir>/config.json`, written the first time. A later run whose config
  differs is refused with every differing key named (a changed learning rate
  would otherwise resume the old model and report it as the new config's),
  unless the caller allows the change; then the differences are logged and the
  new config is recorded.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from typing import Any, Mapping

from absl import logging

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'
_ABSENT = '<absent>'


class WorkdirClaim:
  """A held work directory; release it with `.release()` or `with`."""

  def __init__(self, workdir: str, lock_fd: int):
    self.workdir = workdir
    self._fd = lock_fd

  def release(self) -> None:
    """Drops the lock (idempotent). The lock file stays: deleting it would
    let a third run lock a fresh file while a second still holds the old."""
    if self._fd is None:
      return
    try:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> WorkdirClaim:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def claim(workdir: str, config: Any,
          allow_config_change: bool = False) -> WorkdirClaim:
  """Locks `workdir` for this process and checks it was written under `config`.

  Args:
    workdir: the run's output directory (created if missing).
    config: the run's ConfigDict (or a mapping, or None for no check).
    allow_config_change: record a changed config instead of refusing it.

  Returns:
    The claim; hold it for the whole run.

  Raises:
    ValueError: `workdir` is empty, or it holds a different config and
      `allow_config_change` is False.
    RuntimeError: another live process holds the directory.
  """
  if not workdir or not str(workdir).strip():
    raise ValueError(f'--workdir is empty ({workdir!r}); pass a directory for '
                     'checkpoints and metrics, e.g. --workdir=/tmp/run.')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  held = WorkdirClaim(workdir, _lock(workdir))
  try:
    _check_config(workdir, config, allow_config_change)
  except BaseException:
    held.release()
    raise
  return held


def _lock(workdir: str) -> int:
  """Takes the exclusive lock and writes our pid; returns the open fd."""
  path = os.path.join(workdir, LOCK_FILE)
  # O_RDWR without O_TRUNC: the holder's pid must survive until we own it.
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _read_pid(fd)
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise
    raise RuntimeError(
        f'Work directory {workdir} is in use by another run (pid {holder}); '
        'wait for it to finish, stop it, or pass another --workdir.') from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
  os.fsync(fd)
  return fd


def _read_pid(fd: int) -> str:
  text = os.pread(fd, 64, 0).decode(errors='replace').strip()
  return text or 'unknown'


def _check_config(workdir: str, config: Any, allow_change: bool) -> None:
  """Writes config.json the first time; afterwards compares with it."""
  if config is None:
    return
  new = config_to_json(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    write_json_atomic(path, new)
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(
        f'Cannot read {path} ({e}); it records the config this work directory '
        'was written under. Restore it, or pass another --workdir.') from e
  changes = config_differences(old, new)
  if not changes:
    return
  listing = '\n  '.join(changes)
  if not allow_change:
    raise ValueError(
        f'Work directory {workdir} was written under another config; these '
        f'keys differ (old -> new):\n  {listing}\nResuming would continue the '
        'old run as if the new config had produced it. Pass another --workdir, '
        'or --allow_config_change to resume under the new config.')
  logging.warning('Config of %s changed (allowed by --allow_config_change); '
                  'old -> new:\n  %s', workdir, listing)
  write_json_atomic(path, new)


def config_to_json(config: Any) -> Any:
  """`config` (ConfigDict, mapping or None) as plain JSON values.

  Tuples and sets become lists and non-finite floats the strings 'nan',
  'inf', '-inf' (JSON has no token for them); functions become their
  qualified name and other values JSON cannot hold (dtypes) their repr. The result equals its own JSON round trip,
  so a config compares equal to the one read back from config.json.
  """
  if config is None:
    return None
  return _json_safe(config)


def _json_safe(value: Any) -> Any:
  if hasattr(value, 'to_dict'):  # A ConfigDict nested in a plain mapping.
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return float(value) if math.isfinite(value) else str(value)
  if isinstance(value, (set, frozenset)):
    return sorted((_json_safe(v) for v in value), key=repr)
  if hasattr(value, 'tolist'):  # NumPy scalars and arrays.
    return _json_safe(value.tolist())
  if callable(value) and hasattr(value, '__qualname__'):
    # A function's repr holds its address, which differs between runs.
    return f'{getattr(value, "__module__", "")}.{value.__qualname__}'
  return repr(value)


def flatten_config(tree: Any, prefix: str = 'config') -> dict[str, Any]:
  """{'config.a.b': value}; an empty sub-config contributes no key."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten_config(value, f'{prefix}.{key}'))
  return out


def config_differences(old: Any, new: Any) -> list[str]:
  """'key: old -> new' for every key whose value differs or is on one side."""
  old_flat, new_flat = flatten_config(old), flatten_config(new)
  lines = []
  for key in sorted(set(old_flat) | set(new_flat)):
    a = old_flat.get(key, _ABSENT)
    b = new_flat.get(key, _ABSENT)
    if a != b or type(a) is not type(b):
      lines.append(f'{key}: {_show(a)} -> {_show(b)}')
  return lines


def _show(value: Any) -> str:
  return value if value is _ABSENT else repr(value)


def write_json_atomic(path: str, value: Any) -> None:
  """Writes JSON to a temporary file, fsyncs it, then renames it over `path`.

  A kill at any moment leaves either the old file or the new one, never a
  half-written one.
  """
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True, allow_nan=False)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)
