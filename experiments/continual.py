r"""Continual learning after enrollment: pseudo-labels through verification.

    python -m experiments.continual --config=configs/continual_kws.py \
        --workdir=benchmarks/results/continual
    python -m experiments.continual --config=configs/continual_kws.py:smoke \
        --workdir=/tmp/continual_smoke

Pre-trains (once, cached) the global model, enrolls new users, runs their
unlabelled streams for every variant of the config and writes results.json,
results.md and curves.png to --workdir (see `continual.experiment.run`).
"""
from absl import app

from continual import experiment
from experiments import common

_CONFIG, _WORKDIR = common.define_flags('configs/continual_kws.py:smoke')


def main(argv):
  del argv
  common.run_binary(experiment.run, _CONFIG, _WORKDIR)


if __name__ == '__main__':
  app.run(main)
