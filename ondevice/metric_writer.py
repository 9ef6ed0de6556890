"""Metrics to JSON lines, TensorBoard event files and PNG learning curves.

Every experiment writes `<workdir>/metrics.jsonl` (one JSON object per logged
step, easy to load with pandas or `read_metrics`), TensorBoard summaries under
`<workdir>/tensorboard` through tensorboardX, and plots made by `plot_curves`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, Sequence

from absl import logging


class MetricWriter:
  """Appends scalar metrics to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(
            os.path.join(workdir, 'tensorboard'))
      except ImportError:
        logging.warning('tensorboardX is not installed; writing JSON lines '
                        'only.')

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    record = {'step': int(step)}
    record.update({k: float(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.add_scalar(key, float(value), int(step))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites them."""
    records = [r for r in read_metrics(self.path) if r['step'] <= step]
    with open(self.path, 'w') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict[str, float]]:
  """Loads a metrics.jsonl file; a missing file is an empty list."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: Iterable[Mapping[str, float]], path: str,
                panels: Sequence[tuple[str, Sequence[str]]],
                title: str = '', x_key: str = 'step') -> str:
  """Plots one panel per (ylabel, metric keys) against `x_key` into a PNG.

  Args:
    records: metric records, e.g. from `read_metrics`.
    path: output PNG path.
    panels: e.g. [('loss', ['train_loss', 'test_loss']), ('accuracy',
      ['test_accuracy'])]. Keys missing from every record are left out.
    title: figure title.
    x_key: the x axis ('step' or 'round').

  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = list(records)
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6),
                           squeeze=False)
  for ax, (ylabel, keys) in zip(axes[0], panels):
    for key in keys:
      points = [(r[x_key], r[key]) for r in records
                if key in r and x_key in r and math.isfinite(r[key])]
      if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker='.' if len(xs) < 40 else None, label=key)
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
  """Renders dicts with the same keys as a GitHub markdown table."""
  if not rows:
    return ''
  keys = list(rows[0])
  def fmt(v):
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)
  lines = ['| ' + ' | '.join(keys) + ' |',
           '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(fmt(r.get(k, '')) for k in keys) + ' |'
            for r in rows]
  return '\n'.join(lines)
