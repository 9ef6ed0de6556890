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

import continual
from experiments import common

_CONFIG, _WORKDIR = common.define_flags('configs/continual_kws.py')


def main(argv):
  del argv
  common.setup()
  continual.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
