r"""Centralised training binary.

    python -m experiments.train --config=configs/kws_central.py:smoke \
        --config.num_steps=200 --workdir=/tmp/run

Writes metrics.jsonl, TensorBoard summaries, checkpoints, learning_curve.png
and final_metrics.json to --workdir; rerunning with the same workdir resumes.
"""
from absl import app

from experiments import common
from ondevice import supervised
import quantized_training

_CONFIG, _WORKDIR = common.define_flags('configs/kws_central.py:smoke')


def main(argv):
  del argv
  common.setup()
  config = _CONFIG.value
  quant = quantized_training.get_quant(config.quant)
  supervised.train_and_evaluate(config, _WORKDIR.value,
                                model_kwargs=quant.model_kwargs())


if __name__ == '__main__':
  app.run(main)
