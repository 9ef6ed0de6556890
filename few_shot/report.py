"""Outputs of the few-shot experiment: results.json, report.md and a plot.

`goals` summarises the personalisation results against the targets in
config.report, honestly including misses:

* the best relative detection-rate gain on outlier-accent (and typical)
  users at the configured FAR, over adaptation methods and K <=
  config.report.max_k, against the global model without adaptation, and
  whether it reaches config.report.outlier_gain_goal;
* whether each meta-learned initialisation beats plain fine-tuning of the
  global model (same optimiser, steps and trainable set) at K = 1 and K = 5.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from few_shot import personalize
from ondevice import metric_writer

PLAIN_FINETUNE = 'global+finetune_full'  # the init meta-learning starts from
PLAIN_FINETUNE_ALL = 'global_all+finetune_full'  # trained on every speaker
VERSUS_KS = (1, 5)


def goals(personal: Mapping[str, Any], config) -> dict[str, Any]:
  """The targets of config.report from `personal[label][k][group]`."""
  ks = [k for k in config.personalize.k_values if k <= config.report.max_k]
  out: dict[str, Any] = {'far': config.far}
  if 'global' not in personal or not ks:
    return out
  out.update(best_gains(personal, ks))
  if 'best_outlier_gain' in out:
    out['outlier_gain_goal_met'] = (out['best_outlier_gain']['relative_gain']
                                    >= config.report.outlier_gain_goal)
  if PLAIN_FINETUNE in personal:
    out['meta_vs_plain_finetune'] = meta_vs_plain(personal, config.meta.names)
  return out


def best_gains(personal: Mapping[str, Any], ks) -> dict[str, Any]:
  """Per group, the (init, K) with the largest relative detection-rate gain
  over the global model without adaptation (at the smallest K of `ks`)."""
  base = personal['global'][ks[0]]
  gains = {}
  for label, by_k in personal.items():
    if label == 'global':
      continue
    for k in ks:
      for group in ('outlier', 'typical'):
        if group in by_k[k] and group in base:
          gains.setdefault(group, []).append(
              (personalize.relative_gain(by_k[k][group]['detection_rate'],
                                         base[group]['detection_rate']),
               label, k))
  out = {}
  for group, entries in gains.items():
    gain, label, k = max(entries)
    out[f'best_{group}_gain'] = {
        'relative_gain': gain, 'method': label, 'k': k,
        'baseline_detection_rate': base[group]['detection_rate'],
        'detection_rate': personal[label][k][group]['detection_rate']}
  return out


def meta_vs_plain(personal: Mapping[str, Any], names) -> dict[str, Any]:
  """{'<name>/K=<k>/<group>': meta and plain fine-tuning detection rates}."""
  versus = {}
  for name in names:
    for k in VERSUS_KS:
      if k not in personal[PLAIN_FINETUNE] or name not in personal:
        continue
      for group in ('outlier', 'typical', 'all'):
        meta = personal[name][k].get(group)
        if not meta:
          continue
        entry = {'meta': meta['detection_rate']}
        for key, label in (('plain', PLAIN_FINETUNE),
                           ('plain_all', PLAIN_FINETUNE_ALL)):
          if label in personal and group in personal[label][k]:
            plain = personal[label][k][group]['detection_rate']
            entry[key] = plain
            entry[f'meta_beats_{key}'] = meta['detection_rate'] > plain
        versus[f'{name}/K={k}/{group}'] = entry
  return versus


def _plot(personal, path: str, far: float) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = [g for g in ('typical', 'outlier')
            if any(g in v for by_k in personal.values()
                   for v in by_k.values())]
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups) + 3, 4),
                           squeeze=False, sharey=True)
  colours = plt.cm.tab20(np.linspace(0, 1, 20))
  for ax, group in zip(axes[0], groups):
    for i, (label, by_k) in enumerate(personal.items()):
      ks = sorted(by_k)
      rates = [by_k[k][group]['detection_rate'] for k in ks]
      errs = [by_k[k][group]['detection_rate_sem'] for k in ks]
      # Global models (no adaptation) are flat: dashed, no markers.
      plain = label in ('global', 'global_all')
      ax.errorbar(ks, rates, yerr=None if plain else errs,
                  fmt='--' if plain else '-o', markersize=3, capsize=2,
                  color=colours[i % 20], label=label)
    ax.set_title(f'{group} users')
    ax.set_xlabel('K enrollment utterances per keyword')
    ax.set_xticks(sorted(next(iter(personal.values()))))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f'detection rate at {far:.0%} FAR (+- s.e.m.)')
  axes[0][-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def markdown(results: Mapping[str, Any], config) -> str:
  """The report: goals first, then the tables behind them."""
  lines = ['# Few-shot keyword spotting: personalisation and meta-learning',
           '', f'Keywords: {", ".join(config.keywords)}; detection rate at '
           f'{config.far:.0%} false-accept rate (see few_shot/detection.py).',
           f'Global model: {config.model} {dict(config.model_kwargs)} '
           f'norm={config.norm}, held-out-speaker test accuracy '
           f'{results["global_model"].get("test_accuracy", float("nan")):.3f}.',
           '', '## Goals', '']
  lines += _goal_lines(results['goals'], config)
  lines += ['', '## Detection rate by K', '',
            _detection_table(results['personalisation'])]
  if results.get('keyword_split'):
    lines += ['', f'## {config.keyword_split.n_way}-way K-shot accuracy on '
              'held-out keywords and speakers', '',
              _keyword_split_table(results['keyword_split'])]
  lines += ['', f'Wall time: {results["seconds"]:.0f} s.', '']
  return '\n'.join(lines)


def _goal_lines(g: Mapping[str, Any], config) -> list[str]:
  lines = []
  for group in ('outlier', 'typical'):
    best = g.get(f'best_{group}_gain')
    if best:
      lines.append(
          f'- best relative detection-rate gain, {group} users, K <= '
          f'{config.report.max_k}: **{best["relative_gain"]:+.1%}** '
          f'({best["method"]}, K={best["k"]}: '
          f'{best["baseline_detection_rate"]:.3f} -> '
          f'{best["detection_rate"]:.3f})')
  if 'outlier_gain_goal_met' in g:
    lines.append(f'- outlier gain >= {config.report.outlier_gain_goal:.0%}: '
                 f'**{"met" if g["outlier_gain_goal_met"] else "missed"}**')
  versus = g.get('meta_vs_plain_finetune', {})
  # Without config.meta.all_speakers_baseline there is no global_all column.
  with_all = any('plain_all' in v for v in versus.values())
  if versus:
    lines += ['', 'Meta-learned init vs plain fine-tuning (detection rate; '
              '"global" is the init meta-learning starts from, "global_all" '
              'also saw the meta-training speakers):', '',
              metric_writer.markdown_table([_versus_row(key, v, with_all)
                                            for key, v in versus.items()])]
  return lines


def _detection_table(personal: Mapping[str, Any]) -> str:
  rows = []
  for label, by_k in personal.items():
    for k, groups in by_k.items():
      row = {'init+adaptation': label, 'K': k}
      for group in ('typical', 'outlier'):
        if group in groups:
          row[f'{group} DR'] = groups[group]['detection_rate']
          row[f'{group} FAR'] = groups[group]['false_accept_rate']
          row[f'{group} kw acc'] = groups[group]['keyword_accuracy']
      rows.append(row)
  return metric_writer.markdown_table(rows)


def _keyword_split_table(keyword_split: Mapping[str, Any]) -> str:
  rows = []
  for name, by_k in keyword_split.items():
    for shot, entry in by_k.items():
      rows.append({'learner': name, 'shots': shot,
                   'accuracy': entry['mean'], '95% CI': entry['ci95'],
                   'before meta-training': entry['before_meta_training'],
                   'outer steps/s': entry['meta_train_steps_per_second']})
  return metric_writer.markdown_table(rows)


def _versus_row(key: str, v: dict[str, Any], with_all: bool
                ) -> dict[str, Any]:
  row = {'init/K/group': key, 'meta': v['meta'],
         'FT global': v.get('plain', float('nan')),
         'meta > FT global': v.get('meta_beats_plain', '')}
  if with_all:
    row.update({'FT global_all': v.get('plain_all', float('nan')),
                'meta > FT global_all': v.get('meta_beats_plain_all', '')})
  return row


def write(results: Mapping[str, Any], config, workdir: str) -> None:
  """results.json, report.md and (with personalisation) detection_vs_k.png."""
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=float)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(markdown(results, config))
  if results['personalisation']:
    _plot(results['personalisation'],
          os.path.join(workdir, 'detection_vs_k.png'), config.far)
