r"""Global-model learning curves of several pre-training runs, side by side.

Reads each run's metrics.jsonl (as `central.pretrain` writes it: rows with
`step`, `train_accuracy` and, at evaluations, `test_accuracy`) and
final_metrics.json when present, and writes the final and best test
accuracies (JSON + markdown) and test accuracy against step (a plot).
Used to ask whether a larger seen population lifts the outlier study's
global model:

    python -m benchmarks.pretrain_curves \
        --pretrain_runs='66 speakers=/tmp/o200/global,213 speakers=/tmp/o600/global' \
        --out=benchmarks/results/outliers/global_population.json
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import flags
from benchmarks import cli
from benchmarks import outputs

FLAGS = flags.FlagValues()
_RUNS = flags.DEFINE_list('pretrain_runs', [], 'label=workdir pairs of '
                          'pre-training runs.', flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', '/tmp/pretrain_curves.json', 'JSON path; '
                           'the markdown and plot are written beside it.',
                           flag_values=FLAGS)


def parse_runs(specs: Sequence[str]) -> list[tuple[str, str]]:
  """'label=workdir' strings as (label, workdir) pairs."""
  runs = []
  for spec in specs:
    label, sep, workdir = spec.partition('=')
    if not sep or not label or not workdir:
      raise ValueError(f'--pretrain_runs entry {spec!r}: expected '
                       'label=workdir.')
    if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
      raise ValueError(f'--pretrain_runs entry {spec!r}: {workdir} has no '
                       'metrics.jsonl.')
    runs.append((label, workdir))
  if not runs:
    raise ValueError('--pretrain_runs is empty: give at least one '
                     'label=workdir.')
  return runs


def read_run(workdir: str) -> dict[str, Any]:
  """A run's evaluations (step, train and test accuracy) and final metrics."""
  curve = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'test_accuracy' in row:
        curve.append({'step': row['step'],
                      'train_accuracy': row.get('train_accuracy'),
                      'test_accuracy': row['test_accuracy']})
  final_path = os.path.join(workdir, 'final_metrics.json')
  final = None
  if os.path.exists(final_path):
    with open(final_path) as f:
      final = json.load(f)
  return {'workdir': workdir, 'curve': curve, 'final': final,
          'best_test_accuracy': max((c['test_accuracy'] for c in curve),
                                    default=None),
          'last_test_accuracy': curve[-1]['test_accuracy'] if curve else None}


def markdown(results: dict[str, Any]) -> str:
  """One table row per run."""
  lines = ['# Global model: test accuracy of pre-training runs', '',
           '| run | steps evaluated | last test accuracy | best | '
           'train accuracy at the last evaluation | train examples |',
           '|---|---|---|---|---|---|']
  def number(x):  # 0.0 is a result; only a missing value is blank.
    return '' if x is None else f'{x:.4f}'

  for label, run in results['runs'].items():
    last = run['curve'][-1] if run['curve'] else {}
    examples = (run['final'] or {}).get('num_train_examples', '')
    lines.append(f"| {label} | {last.get('step', '')} | "
                 f"{number(run['last_test_accuracy'])} | "
                 f"{number(run['best_test_accuracy'])} | "
                 f"{number(last.get('train_accuracy'))} | {examples} |")
  return '\n'.join(lines + [''])


def plot(path: str, results: dict[str, Any]) -> None:
  """Test accuracy against pre-training step, one line per run."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  # pylint: enable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for label, run in results['runs'].items():
    ax.plot([c['step'] for c in run['curve']],
            [c['test_accuracy'] for c in run['curve']], 'o-', label=label)
  ax.set_xlabel('pre-training step')
  ax.set_ylabel('test accuracy (held-out seen speakers)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  runs = parse_runs(_RUNS.value)
  results = {'runs': {label: read_run(workdir) for label, workdir in runs}}
  outputs.write(_OUT.value, results, markdown(results))
  plot(os.path.splitext(_OUT.value)[0] + '.png', results)


if __name__ == '__main__':
  cli.run(main, FLAGS)
