"""Metrics to JSON lines, TensorBoard event files and PNG learning curves.

Every experiment writes `<workdir>/metrics.jsonl` (one JSON object per logged
step, easy to load with pandas or `read_metrics`), TensorBoard summaries under
`<workdir>/tensorboard` through tensorboardX, and plots made by `plot_curves`.

metrics.jsonl is strict JSON: a non-finite value (a NaN loss, an infinite
epsilon) is written as `null`, since `NaN` and `Infinity` are not JSON tokens
and other readers reject them; `read_metrics` reads every `null` back as
float('nan'). Each line is flushed and fsynced as it is written, so a killed
run loses at most the line it was writing; that torn last line is dropped
with a warning by `read_metrics` and removed from the file by the writer.
A damaged line anywhere else is an error: it is not what a kill leaves.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from absl import logging


class MetricWriter:
  """Appends scalar metrics to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    # A line torn by a kill would otherwise be glued to the next record.
    _drop_torn_tail(self.path)
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
    """Appends one record; it is on disk when this returns."""
    record = {'step': int(step)}
    # Counters stay integers (a round number reads back as 5, not 5.0).
    record.update({k: v if isinstance(v, int) and not isinstance(v, bool)
                   else float(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(encode_record(record) + '\n')
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.add_scalar(key, float(value), int(step))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (and a torn last line): a resumed run
    rewrites them. The file is replaced atomically."""
    records = [r for r in read_metrics(self.path) if r['step'] <= step]
    tmp = f'{self.path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
      for r in records:
        f.write(encode_record(r) + '\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def encode_record(record: Mapping[str, Any]) -> str:
  """One strict-JSON line; non-finite floats become null."""
  return json.dumps({k: _finite_or_none(v) for k, v in record.items()},
                    allow_nan=False)


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _decode(value: Any) -> Any:
  return math.nan if value is None else value


def read_metrics(path: str) -> list[dict[str, float]]:
  """Loads a metrics.jsonl file; a missing file is an empty list.

  `null` values are read as float('nan'). A last line that does not parse
  (a kill during a write) is dropped with a warning.

  Raises:
    ValueError: a line other than the last does not parse, naming the file
      and the line number.
  """
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.read().split('\n')
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  records = []
  for n, (number, line) in enumerate(numbered):
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError(f'a {type(record).__name__}, not an object')
    except ValueError as e:
      if n == len(numbered) - 1:
        logging.warning('Dropping the torn last line %d of %s (a run was '
                        'killed while writing it): %r', number, path,
                        line[:80])
        break
      raise ValueError(
          f'{path}, line {number}, is not a JSON record ({e}); only the last '
          'line can be torn by a kill, so the file is damaged. Repair or '
          'delete that line.') from e
    records.append({k: _decode(v) for k, v in record.items()})
  return records


def _drop_torn_tail(path: str) -> None:
  """Cuts an unterminated or unparsable last line off the file."""
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    data = f.read()
  body, _, tail = data.rstrip(b'\n').rpartition(b'\n')
  keep = len(body) + 1 if body else 0
  if not tail.strip() or (data.endswith(b'\n') and _parses(tail)):
    return
  if _parses(tail):  # Complete record whose newline was not written.
    with open(path, 'ab') as f:
      f.write(b'\n')
    return
  logging.warning('Removing the torn last line of %s (a run was killed '
                  'while writing it): %r', path, tail[:80])
  with open(path, 'r+b') as f:
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())


def _parses(line: bytes) -> bool:
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


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
