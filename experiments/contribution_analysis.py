r"""Contribution analysis and budgeted sparse-update search (Lin et al. 2022).

    python -m experiments.contribution_analysis \
        --config=configs/contribution_kws.py:smoke --workdir=/tmp/run

Writes contribution.json, contribution.md and contribution_gains.png (and
the pre-training run under pretrain/) to --workdir.
"""
from absl import app

from experiments import common
from sparse_updates import experiment

_CONFIG, _WORKDIR = common.define_flags('configs/contribution_kws.py:smoke')


def main(argv):
  del argv
  common.run_binary(experiment.run, _CONFIG, _WORKDIR)


if __name__ == '__main__':
  app.run(main)
