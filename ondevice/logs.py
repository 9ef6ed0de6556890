"""Keeps experiment output readable: our progress lines, not library chatter.

Binaries log progress with absl at INFO. Orbax and JAX's backend probing also
log at INFO on every checkpoint, which buries the progress lines; this filter
drops their INFO records (warnings and errors still show).
"""
from __future__ import annotations

import logging as std_logging

from absl import logging

_CHATTY = ('/orbax/', 'xla_bridge.py', '/jax/_src/')


class _DropLibraryInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno > std_logging.INFO:
      return True
    return not any(part in record.pathname for part in _CHATTY)


def setup_experiment_logging() -> None:
  """INFO progress from our code; only warnings from orbax and JAX."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
