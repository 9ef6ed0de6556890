r"""FedUV speaker verification against softmax baselines.

    python -m experiments.feduv --config=configs/feduv_kws.py \
        --workdir=/tmp/feduv

Writes results.json, results.md, roc.png and trials_<variant>.npz to the work
directory. Variants can run in separate processes and be merged:

    python -m experiments.feduv --config=configs/feduv_kws.py \
        --config.variants=feduv,fed_softmax --workdir=/tmp/feduv_a
    python -m experiments.feduv --config=configs/feduv_kws.py \
        --config.variants=feduv_dp,fed_softmax_dp --workdir=/tmp/feduv_b
    python -m experiments.feduv --combine=/tmp/feduv_a,/tmp/feduv_b \
        --workdir=benchmarks/results/feduv
"""
from absl import app
from absl import flags

from experiments import common
from fedjax_ext import verification_report

_CONFIG, _WORKDIR = common.define_flags('configs/feduv_kws.py:smoke',
                                         config_required=False)
_COMBINE = flags.DEFINE_list(
    'combine', None, 'Work directories of finished runs to merge into '
    '--workdir instead of training (then --config is not needed).')


def main(argv):
  del argv
  common.setup()
  if _COMBINE.value:
    verification_report.combine(_COMBINE.value, _WORKDIR.value)
    return
  if _CONFIG.value is None:
    raise app.UsageError('Pass --config (or --combine).')
  verification_report.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
