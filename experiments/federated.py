r"""Federated training binary (the project's main job).

    python -m experiments.federated --config=configs/fed_kws.py \
        --workdir=/tmp/fed_kws

Writes metrics.jsonl (round, accuracy, bytes per client, skipped clients),
TensorBoard summaries, checkpoints, accuracy_vs_round.png and
final_metrics.json; rerunning with the same workdir resumes.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from fedjax_ext import training
from ondevice import logs
import quantized_training

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. configs/fed_kws.py:smoke.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logs.setup_experiment_logging()
  config = _CONFIG.value
  quant = quantized_training.get_quant(config.quant)
  training.train_and_evaluate(config, _WORKDIR.value,
                              model_kwargs=quant.model_kwargs())


if __name__ == '__main__':
  app.run(main)
