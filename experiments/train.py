r"""Centralised training binary.

    python -m experiments.train --config=configs/kws_central.py:smoke \
        --config.num_steps=200 --workdir=/tmp/run
    python -m experiments.train --config=configs/fmnist_central.py:smoke \
        --config.quant=int8_fwd_bwd_sr --config.optimizer_state.name=int8 \
        --workdir=/tmp/run_int8

Writes metrics.jsonl, checkpoints, learning_curve.png and final_metrics.json
to --workdir; rerunning with the same workdir resumes.
"""
from absl import app

from central import supervised
from experiments import common

_CONFIG, _WORKDIR = common.define_flags('configs/kws_central.py:smoke')


def main(argv):
  del argv
  common.run_binary(supervised.run, _CONFIG, _WORKDIR)


if __name__ == '__main__':
  app.run(main)
