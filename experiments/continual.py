r"""Continual learning after enrollment: pseudo-labels through verification.

    python -m experiments.continual --config=configs/continual_kws.py \
        --workdir=benchmarks/results/continual
    python -m experiments.continual --config=configs/continual_kws.py:smoke \
        --workdir=/tmp/continual_smoke

Pre-trains (once, cached) the global model, enrolls rare-accent users, runs
their unlabelled streams for every variant of the config and writes
results.json, results.md and curves.png to --workdir.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import continual

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. configs/continual_kws.py.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  continual.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
