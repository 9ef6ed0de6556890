"""What the experiment binaries share: --config, --workdir and logging.

    _CONFIG, _WORKDIR = common.define_flags('configs/fed_kws.py:smoke')

    def main(argv):
      del argv
      common.run_binary(library.run, _CONFIG, _WORKDIR)

`run_binary` holds the work directory for the whole run (`ondevice.workdir`):
a second run on the same directory is refused, and so is a run whose config
differs from the one the directory was written under, unless
--allow_config_change is passed.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from absl import flags
from ml_collections import config_flags

from ondevice import logs
from ondevice import options
from ondevice import workdir as workdir_lib

_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume a --workdir written under a different config, recording the new '
    'config (the differences are logged). Without it such a run is refused.')


def define_flags(example: str, config_required: bool = True):
  """Defines --config (a locked config file) and --workdir; returns both."""
  config = config_flags.DEFINE_config_file(
      'config', None, f'Path to a config file, e.g. {example}.',
      lock_config=True)
  # ml_collections defers a missing file's error to the first use of the
  # config, where it reads "Failed loading config file config_config"; the
  # path is checked first instead, while flags are parsed.
  flag = flags.FLAGS[config.name]
  flag.parser = _ExistingConfigFile(flag.parser, example)
  # --config.<key> naming no field is a flag error that says which part.
  options.name_unknown_overrides(flag, sys.argv)
  workdir = flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.mark_flags_as_required(['config', 'workdir'] if config_required
                               else ['workdir'])
  return config, workdir


def setup() -> None:
  """INFO progress from our code, warnings only from orbax and JAX."""
  logs.setup_experiment_logging()


def run_binary(run_fn: Callable[[Any, str], Any], config_flag: Any,
               workdir_flag: Any) -> None:
  """Runs `run_fn(config, workdir)` holding the work directory throughout.

  Args:
    run_fn: the research package's `run(config, workdir)`.
    config_flag: the --config FlagHolder from `define_flags`.
    workdir_flag: the --workdir FlagHolder from `define_flags`.

  Raises:
    ValueError: --workdir is empty, or it was written under another config
      and --allow_config_change is not set.
    RuntimeError: another live run holds --workdir.
  """
  setup()
  config, workdir = config_flag.value, workdir_flag.value
  with workdir_lib.claim(workdir, config, _ALLOW_CONFIG_CHANGE.value):
    run_fn(config, workdir)


class _ExistingConfigFile(flags.ArgumentParser):
  """Checks that --config names a readable file, then lets `inner` load it."""

  def __init__(self, inner: flags.ArgumentParser, example: str):
    self._inner = inner
    self._example = example

  def parse(self, argument):
    if isinstance(argument, str):
      check_config_path(argument.split(':', 1)[0], self._example)
    return self._inner.parse(argument)

  def flag_type(self) -> str:
    return self._inner.flag_type()


def check_config_path(path: str, example: str = 'configs/fed_kws.py') -> None:
  """Raises a ValueError saying why `path` cannot be a config file."""
  if not path.strip():
    raise ValueError(f'the config path is empty; pass e.g. --config={example}')
  where = f'{path!r} (resolved to {os.path.abspath(path)})'
  if not os.path.exists(path):
    raise ValueError(
        f'config file {where} does not exist; pass e.g. --config={example}')
  if not os.path.isfile(path):
    raise ValueError(f'config file {where} exists but is not a file')
  if not os.access(path, os.R_OK):
    raise ValueError(
        f'config file {where} exists but cannot be read (permission denied)')
