"""Writes a contribution analysis: JSON, a markdown report and a bar plot.

The plot follows Lin et al. (2022), Fig. 5: the accuracy gain of updating
each layer's biases and each layer's weights alone, input layer on the left.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ondevice import metric_writer


def gain_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per layer: its bias and weight gains (percentage points)."""
  layers: dict[str, dict[str, Any]] = {}
  for name in results['units']:
    layer, kind = name.rsplit(':', 1)
    row = layers.setdefault(layer, {'layer': layer, 'bias_gain_pts': '',
                                    'weight_gain_pts': ''})
    row[f'{kind}_gain_pts'] = 100.0 * results['gains'][name]
  return list(layers.values())


def markdown(results: Mapping[str, Any]) -> str:
  task = results.get('task', {'kind': 'same_keywords'})
  if task['kind'] == 'new_keywords':
    about = (f"Task: learn {len(task['transfer_words'])} new keywords "
             f"({', '.join(task['transfer_words'])}) on held-out speakers, "
             f"from a model pre-trained on the other "
             f"{len(task['pretrain_words'])} words, with a freshly "
             'initialised classifier.')
  else:
    about = ('Task: personalise the pre-trained keywords to held-out '
             'speakers.')
  lines = [
      '# Contribution analysis (Lin et al., 2022)', '', about, '',
      f'Classifier-only fine-tuning reaches '
      f'{100 * results["baseline_accuracy"]:.2f}% on the validation split; '
      'gains are in percentage points over it.', '',
      metric_writer.markdown_table(gain_rows(results)), '',
      '## Searched schemes', '',
      f'Candidates: units whose gain exceeds {100 * results["min_gain"]:.2f} '
      'points (the noise level of the validation accuracy).', '',
      metric_writer.markdown_table([
          {'budget_kb': r['budget_bytes'] / 1024,
           'memory_kb': r['memory_bytes'] / 1024,
           'summed_gain_pts': 100 * r['gain'],
           'feasible': r['feasible'],
           'units': ', '.join(r['units']) or '(classifier only)'}
          for r in results['search']]), '',
      '## Test accuracy of each scheme', '',
      f'Memory: analytic training memory (excluding frozen weights) at batch '
      f'{results["memory_batch_shape"]}, ReLU masks of '
      f'{results["relu_mask_bits"]} bit(s); upload: trainable bytes a client '
      'sends per round. Each scheme is fine-tuned at the learning rate '
      '(learning_rate column, where present) of its best validation '
      'accuracy.', '',
      metric_writer.markdown_table(results['schemes']), '']
  return '\n'.join(lines)


def plot(results: Mapping[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = gain_rows(results)
  xs = range(len(rows))
  width = 0.4
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 3.5))
  for offset, kind in ((-width / 2, 'bias'), (width / 2, 'weight')):
    values = [r[f'{kind}_gain_pts'] or 0.0 for r in rows]
    ax.bar([x + offset for x in xs], values, width, label=f'{kind} only')
  ax.axhline(0.0, color='black', linewidth=0.5)
  ax.set_xticks(list(xs))
  ax.set_xticklabels([r['layer'] for r in rows], rotation=45, ha='right')
  ax.set_ylabel('accuracy gain (points)')
  ax.set_title('Gain of updating one layer (+ classifier)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results: Mapping[str, Any], workdir: str) -> None:
  """contribution.json, contribution.md, contribution_gains.png."""
  with open(os.path.join(workdir, 'contribution.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, 'contribution.md'), 'w') as f:
    f.write(markdown(results))
  plot(results, os.path.join(workdir, 'contribution_gains.png'))
