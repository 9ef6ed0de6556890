r"""Federated training binary (the project's main job).

    python -m experiments.federated --config=configs/fed_kws.py \
        --workdir=/tmp/fed_kws

Writes metrics.jsonl (round, accuracy, bytes per client, skipped clients),
TensorBoard summaries, checkpoints, accuracy_vs_round.png and
final_metrics.json; rerunning with the same workdir resumes.
"""
from absl import app

from experiments import common
from fedjax_ext import training
import quantized_training

_CONFIG, _WORKDIR = common.define_flags('configs/fed_kws.py:smoke')


def main(argv):
  del argv
  common.setup()
  config = _CONFIG.value
  quant = quantized_training.get_quant(config.quant)
  training.train_and_evaluate(config, _WORKDIR.value,
                              model_kwargs=quant.model_kwargs())


if __name__ == '__main__':
  app.run(main)
