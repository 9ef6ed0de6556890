r"""Merges finished FedUV runs of different variants into one report.

    python -m experiments.feduv_combine --runs=/tmp/feduv_a,/tmp/feduv_b \
        --out=benchmarks/results/feduv

The runs must share their config except `variants`; writes results.json,
results.md, roc.png and trials_<variant>.npz to --out. (The flag is not
--workdir, so this binary and experiments/feduv.py can share a process.)
"""
from absl import app
from absl import flags

from experiments import common
from fedjax_ext.feduv import report

_RUNS = flags.DEFINE_list('runs', None, 'Work directories of finished '
                          'experiments.feduv runs.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output directory.', required=True)


def main(argv):
  del argv
  common.setup()
  report.combine(_RUNS.value, _OUT.value)


if __name__ == '__main__':
  app.run(main)
