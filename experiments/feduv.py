r"""FedUV speaker verification against softmax baselines.

    python -m experiments.feduv --config=configs/feduv_kws.py \
        --workdir=/tmp/feduv

Writes results.json, results.md, roc.png and trials_<variant>.npz to the work
directory, and each variant's checkpoints and metrics.jsonl under
<workdir>/variants/<variant>/; rerunning with the same workdir resumes.
Variants can run in separate processes and be merged with
`experiments.feduv_combine`:

    python -m experiments.feduv --config=configs/feduv_kws.py \
        --config.variants=feduv,fed_softmax --workdir=/tmp/feduv_a
    python -m experiments.feduv --config=configs/feduv_kws.py \
        --config.variants=feduv_dp,fed_softmax_dp --workdir=/tmp/feduv_b
    python -m experiments.feduv_combine --runs=/tmp/feduv_a,/tmp/feduv_b \
        --out=/tmp/feduv
"""
from absl import app

from experiments import common
from fedjax_ext.feduv import experiment

_CONFIG, _WORKDIR = common.define_flags('configs/feduv_kws.py:smoke')


def main(argv):
  del argv
  common.run_binary(experiment.run, _CONFIG, _WORKDIR)


if __name__ == '__main__':
  app.run(main)
