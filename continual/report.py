"""Summaries, the markdown table, the JSON file and the plot of a run.

The first variant of a config is the method under test; its goals are
checked in the markdown: a user-accuracy gain of at least `GAIN_GOAL` over
the enrolled model, at most `FORGETTING_GOAL` of forgetting on the global
held-out speakers (against the pre-trained model), and pseudo-label
precision of at least `PRECISION_GOAL`. Accuracies are fractions in the JSON
and percentage points in the markdown.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

GAIN_GOAL = 0.10
FORGETTING_GOAL = 0.01
PRECISION_GOAL = 0.95


def summarize_variant(per_user: Sequence[dict[str, Any]],
                      pretrained_global: float) -> dict[str, Any]:
  """Means over users, pooled pseudo-label quality and the mean curve."""
  mean = lambda key: float(np.mean([u[key] for u in per_user]))
  accepted = sum(u['quality']['accepted'] for u in per_user)
  correct = sum(u['quality']['correct'] for u in per_user)
  positives = sum(u['quality']['positives'] for u in per_user)
  correct_positive = sum(u['quality']['recall'] * u['quality']['positives']
                         for u in per_user)
  summary = {
      'pretrained_user_accuracy': mean('pretrained_user_accuracy'),
      'enrolled_user_accuracy': mean('enrolled_user_accuracy'),
      'enrolled_clean_user_accuracy': mean('enrolled_clean_user_accuracy'),
      'final_user_accuracy': mean('final_user_accuracy'),
      'enrolled_global_accuracy': mean('enrolled_global_accuracy'),
      'final_global_accuracy': mean('final_global_accuracy'),
      'precision': correct / accepted if accepted else 1.0,
      'recall': correct_positive / positives if positives else 0.0,
      'accepted': accepted,
  }
  summary['user_gain'] = (summary['final_user_accuracy'] -
                          summary['enrolled_user_accuracy'])
  summary['forgetting'] = pretrained_global - summary['final_global_accuracy']
  summary['forgetting_vs_enrolled'] = (summary['enrolled_global_accuracy'] -
                                       summary['final_global_accuracy'])
  num_points = min(len(u['curve']) for u in per_user)
  curve = []
  for i in range(num_points):
    point = {'clips': per_user[0]['curve'][i]['clips']}
    for key in ('user_accuracy', 'global_accuracy', 'precision', 'recall'):
      values = [u['curve'][i][key] for u in per_user if key in u['curve'][i]]
      if values:
        point[key] = float(np.mean(values))
    curve.append(point)
  return {'mean': summary, 'curve': curve, 'users': list(per_user)}


def _pts(value: float) -> str:
  return f'{100 * value:.1f}'


def _drift_text(stream: dict[str, Any]) -> str:
  drift = stream['drift']
  name = drift['name']
  if name == 'none':
    return 'no drift'
  params = drift[name]
  end = (f"{params['snr_db']:g} dB SNR" if name == 'noise' else
         f"{params['rate']:g}x tempo")
  return (f"{name} drift from {params['start']:.0%} of the stream to {end} "
          'at its end')


def _method_text(config: dict[str, Any]) -> str:
  learner, pseudo = config['learner'], config['pseudo']
  method = learner['method']
  text = (f"pseudo-labels at confidence >= {pseudo['confidence']:g} and "
          f"verification at {pseudo['target_far']:.0%} enrollment FAR")
  params = method.get(method['name'], {})
  if method['name'] == 'pseudo_label' and params.get('teacher_bn'):
    text += (', labelled with batch-norm statistics of the last '
             f"{params['bn_window']} clips")
  if method['name'] != 'pseudo_label':
    text = f"method {method['name']}"
  return text + f"; {learner['steps_per_chunk']} steps per chunk"


def _regularizer_text(config: dict[str, Any]) -> str:
  reg = config['regularizer']
  params = reg.get(reg['name'], {})
  values = ', '.join(f'{k} {v:g}' for k, v in sorted(params.items())
                     if isinstance(v, (int, float)) and not isinstance(v, bool))
  return f"regulariser {reg['name']}" + (f' ({values})' if values else '')


def _scenario(config: dict[str, Any]) -> str:
  stream, users = config['stream'], config['users']
  return (f"Scenario: {users['num_typical']} typical and "
          f"{users['num_outlier']} rare-accent users, K = "
          f"{users['num_enroll']} enrollment utterances per keyword, a "
          f"stream of {stream['length']} clips (mix {tuple(stream['mix'])} "
          'of user keywords, user non-keywords, other speakers, noise) in '
          f"chunks of {stream['chunk_size']}, {_drift_text(stream)}; quant "
          f"{config['quant']}, trainable {config['trainable']['name']}. Base "
          f'run: {_method_text(config)}; {_regularizer_text(config)}. Each '
          'variant changes the fields its name says.')


def _comparison(results: dict[str, Any]) -> list[str]:
  """The intro and one row per variant."""
  lines = [
      '# Continual keyword learning after enrollment',
      '',
      f"Pre-trained global model: {_pts(results['pretrained_global_accuracy'])}"
      '% on held-out speakers. Users: speakers unseen in pre-training. '
      'Accuracies in %, means over users. User accuracies are on held-out '
      'clips of each user in the acoustic conditions at the end of the '
      'stream (after any drift); gain = after the stream - enrolled; '
      'forgetting = pre-trained - after the stream, on all held-out '
      'speakers; pseudo-label precision/recall pooled over users (recall '
      "over the users' own keyword clips).",
      '',
      _scenario(results['config']),
      '',
      '| variant | user: pre-trained | enrolled | after stream | gain | '
      'global after | forgetting | PL precision | PL recall | accepted |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for name, variant in results['variants'].items():
    m = variant['mean']
    precision = _pts(m['precision']) if m['accepted'] else '-'
    recall = _pts(m['recall']) if m['accepted'] else '-'
    lines.append(
        f"| {name} | {_pts(m['pretrained_user_accuracy'])} | "
        f"{_pts(m['enrolled_user_accuracy'])} | "
        f"{_pts(m['final_user_accuracy'])} | {100 * m['user_gain']:+.1f} | "
        f"{_pts(m['final_global_accuracy'])} | "
        f"{100 * m['forgetting']:+.1f} | {precision} | {recall} | "
        f"{int(m['accepted'])} |")
  return lines


def _goals(name: str, main: dict[str, Any]) -> list[str]:
  """Whether the main variant met GAIN_GOAL, FORGETTING_GOAL, PRECISION_GOAL."""
  checks = [
      (f'user gain >= {100 * GAIN_GOAL:g} points',
       main['user_gain'] >= GAIN_GOAL, f"{100 * main['user_gain']:+.1f}"),
      (f'forgetting <= {100 * FORGETTING_GOAL:g} point',
       main['forgetting'] <= FORGETTING_GOAL,
       f"{100 * main['forgetting']:+.1f}"),
      (f'pseudo-label precision >= {100 * PRECISION_GOAL:g}%',
       main['precision'] >= PRECISION_GOAL, _pts(main['precision'])),
  ]
  return ['', f'Goals for `{name}`:', ''] + [
      f"- {what}: {value} ({'met' if ok else 'MISSED'})"
      for what, ok, value in checks]


def _per_user(name: str, users: list[dict[str, Any]]) -> list[str]:
  """One row per user of the main variant."""
  lines = ['', f'Per user, `{name}`:', '',
           '| user | accent | threshold | enroll FAR | enroll FRR | '
           'user: enrolled | after | global after | precision | recall |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for u in users:
    q = u['quality']
    lines.append(
        f"| {u['index']} | {u['accent']} | {u['threshold']:.3f} | "
        f"{_pts(u['enrollment_far'])} | {_pts(u['enrollment_frr'])} | "
        f"{_pts(u['enrolled_user_accuracy'])} | "
        f"{_pts(u['final_user_accuracy'])} | "
        f"{_pts(u['final_global_accuracy'])} | {_pts(q['precision'])} | "
        f"{_pts(q['recall'])} |")
  return lines


def _by_source(name: str, users: list[dict[str, Any]]) -> list[str]:
  """Accepted clips per stream source, summed over the main variant's users."""
  lines = ['', f'Accepted clips by source, `{name}` (all users):', '',
           '| source | clips | accepted | correct label |',
           '| --- | --- | --- | --- |']
  for source in users[0]['quality']['by_source']:
    total = {k: sum(u['quality']['by_source'][source][k] for u in users)
             for k in ('clips', 'accepted', 'correct')}
    lines.append(f"| {source} | {total['clips']} | {total['accepted']} | "
                 f"{total['correct']} |")
  return lines


def markdown(results: dict[str, Any]) -> str:
  """The comparison table, the goal check and the per-user tables."""
  variants = results['variants']
  main = next(iter(variants))
  users = variants[main]['users']
  lines = (_comparison(results) + _goals(main, variants[main]['mean']) +
           _per_user(main, users) + _by_source(main, users))
  lines.append(f"\nRun time: {results.get('seconds', 0):.0f} s.")
  return '\n'.join(lines) + '\n'


def plot(results: dict[str, Any], path: str) -> str:
  """User and global accuracy against clips heard, one line per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = (('user_accuracy', 'user accuracy (new users)'),
            ('global_accuracy', 'global accuracy (held-out speakers)'),
            ('precision', 'pseudo-label precision (cumulative)'))
  for ax, (key, title) in zip(axes, panels):
    for name, variant in results['variants'].items():
      points = [p for p in variant['curve'] if key in p]
      if points:
        ax.plot([p['clips'] for p in points],
                [100 * p[key] for p in points], marker='o', label=name)
    if key == 'global_accuracy':
      ax.axhline(100 * results['pretrained_global_accuracy'], color='gray',
                 linestyle='--', label='pre-trained')
    ax.set_title(title)
    ax.set_xlabel('stream clips heard')
    ax.set_ylabel('%')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(results: dict[str, Any], workdir: str) -> None:
  """results.json, results.md and curves.png in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=float)
  text = markdown(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  plot(results, os.path.join(workdir, 'curves.png'))
  print(text)
