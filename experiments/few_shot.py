r"""Few-shot keyword-spotting binary: meta-learned inits and personalisation.

    python -m experiments.few_shot --config=configs/few_shot_kws.py:smoke \
        --workdir=/tmp/few_shot_smoke

Writes results.json, report.md and detection_vs_k.png to --workdir, with
the global model (resumable) under global/ and meta-training metrics under
meta_<name>/ and keyword_split/ (see few_shot/experiment.py).
"""
from absl import app

from experiments import common
from few_shot import experiment

_CONFIG, _WORKDIR = common.define_flags('configs/few_shot_kws.py:smoke')


def main(argv):
  del argv
  common.run_binary(experiment.run, _CONFIG, _WORKDIR)


if __name__ == '__main__':
  app.run(main)
