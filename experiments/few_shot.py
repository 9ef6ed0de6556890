r"""Few-shot keyword-spotting binary: meta-learned inits and personalisation.

    python -m experiments.few_shot --config=configs/few_shot_kws.py:smoke \
        --workdir=/tmp/few_shot_smoke

Writes results.json, report.md and detection_vs_k.png to --workdir, with
the global model (resumable) under global/ and meta-training metrics under
meta_<name>/ and keyword_split/.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import few_shot

_CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'Path to a config file, e.g. configs/few_shot_kws.py:smoke.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  few_shot.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
