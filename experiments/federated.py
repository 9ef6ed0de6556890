r"""Federated training binary (the project's main job).

    python -m experiments.federated --config=configs/fed_kws.py \
        --workdir=/tmp/fed_kws

Writes metrics.jsonl (round, accuracy, bytes per client, skipped clients),
TensorBoard summaries, checkpoints, accuracy_vs_round.png and
final_metrics.json; rerunning with the same workdir resumes.
"""
from absl import app

from experiments import common
from fedjax_ext import experiment

_CONFIG, _WORKDIR = common.define_flags('configs/fed_kws.py:smoke')


def main(argv):
  del argv
  common.run_binary(experiment.run, _CONFIG, _WORKDIR)


if __name__ == '__main__':
  app.run(main)
