r"""Centralised training binary.

    python -m experiments.train --config=configs/kws_central.py:smoke \
        --config.num_steps=200 --workdir=/tmp/run

Writes metrics.jsonl, TensorBoard summaries, checkpoints, learning_curve.png
and final_metrics.json to --workdir; rerunning with the same workdir resumes.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from ondevice import logs
from ondevice import supervised
import quantized_training

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. configs/kws_central.py:smoke.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logs.setup_experiment_logging()
  config = _CONFIG.value
  quant = quantized_training.get_quant(config.quant)
  supervised.train_and_evaluate(config, _WORKDIR.value,
                                model_kwargs=quant.model_kwargs())


if __name__ == '__main__':
  app.run(main)
