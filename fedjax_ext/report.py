"""What a federated run leaves behind: final_metrics.json, a plot, a table.

`final_metrics.json` is strict JSON: a value that is not a finite number (the
epsilon of DP with noise multiplier 0, which protects nothing) is written as
null rather than as a bare `Infinity`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from ondevice import metric_writer

FINAL_METRICS = 'final_metrics.json'
PLOT = 'accuracy_vs_round.png'


def json_safe(value: Any) -> Any:
  """`value` with every non-finite float replaced by None (JSON null)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def best_test_accuracy(records: Sequence[Mapping[str, Any]]) -> float | None:
  """The highest test accuracy logged during the run (None if none was)."""
  accs = [r['test_accuracy'] for r in records if 'test_accuracy' in r]
  return max(accs) if accs else None


def write(workdir: str, results: Mapping[str, Any],
          records: Sequence[Mapping[str, Any]], title: str) -> str:
  """Writes final_metrics.json and the learning curves; returns a table.

  Args:
    workdir: the run's directory.
    results: the final metrics.
    records: the rows of metrics.jsonl.
    title: the plot's title.

  Returns:
    The final metrics as a markdown table.
  """
  with open(os.path.join(workdir, FINAL_METRICS), 'w') as f:
    json.dump(json_safe(dict(results)), f, indent=2, allow_nan=False)
  panels = [('loss', ['train_loss', 'test_loss']),
            ('accuracy', ['train_accuracy', 'test_accuracy',
                          'personalized_accuracy', 'global_accuracy']),
            ('detection rate', ['personalized_detection_rate',
                                'global_detection_rate'])]
  # A panel whose metrics no record has (no personalisation) is left out.
  panels = [(name, keys) for name, keys in panels
            if any(k in r for r in records for k in keys)]
  metric_writer.plot_curves(records, os.path.join(workdir, PLOT), panels,
                            title=title, x_key='round')
  return metric_writer.markdown_table(
      [{'metric': k, 'value': v} for k, v in results.items()])
