"""What the experiment binaries share: --config, --workdir and logging.

    _CONFIG, _WORKDIR = common.define_flags('configs/fed_kws.py:smoke')

    def main(argv):
      del argv
      common.setup()
      library.run(_CONFIG.value, _WORKDIR.value)
"""
from absl import flags
from ml_collections import config_flags

from ondevice import logs


def define_flags(example: str, config_required: bool = True):
  """Defines --config (a locked config file) and --workdir; returns both."""
  config = config_flags.DEFINE_config_file(
      'config', None, f'Path to a config file, e.g. {example}.',
      lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.mark_flags_as_required(['config', 'workdir'] if config_required
                               else ['workdir'])
  return config, workdir


def setup() -> None:
  """INFO progress from our code, warnings only from orbax and JAX."""
  logs.setup_experiment_logging()
