r"""Contribution analysis and budgeted sparse-update search (Lin et al. 2022).

    python -m experiments.contribution_analysis \
        --config=configs/contribution_kws.py:smoke --workdir=/tmp/run

Writes contribution.json, contribution.md and contribution_gains.png (and
the pre-training run under pretrain/) to --workdir.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sparse_updates import contribution

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. '
    'configs/contribution_kws.py:smoke.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  contribution.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
