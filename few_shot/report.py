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
GROUPS = ('outlier', 'worst', 'typical')
# Typical users may lose at most this much detection rate (absolute) for an
# adaptation to count as helping outliers without hurting everyone else.
TYPICAL_DROP = 0.01


def goals(personal: Mapping[str, Any], config,
          per_user: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The targets of config.report from `personal[label][k][group]` (and,
  given per-user detection rates `per_user[label][k]`, paired comparisons
  of every meta-learned init with plain fine-tuning at K = 1)."""
  ks = [k for k in config.personalize.k_values if k <= config.report.max_k]
  out: dict[str, Any] = {'far': config.far}
  if 'global' not in personal or not ks:
    return out
  out.update(best_gains(personal, ks))
  if 'typical' in personal['global'][ks[0]]:
    for group in ('outlier', 'worst'):
      gain = best_gain_keeping_typical(personal, ks, group)
      if gain:
        out[f'best_{group}_gain_typical_kept'] = gain
  if 'best_outlier_gain' in out:
    out['outlier_gain_goal_met'] = (out['best_outlier_gain']['relative_gain']
                                    >= config.report.outlier_gain_goal)
  if PLAIN_FINETUNE in personal:
    out['meta_vs_plain_finetune'] = meta_vs_plain(personal, config.meta.names)
  if per_user and min(config.personalize.k_values) == 1:
    out['meta_vs_finetune_k1'] = meta_vs_finetune(per_user,
                                                  config.meta.names, 1)
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
      for group in GROUPS:
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


def best_gain_keeping_typical(personal: Mapping[str, Any], ks, group: str,
                              max_drop: float = TYPICAL_DROP
                              ) -> dict[str, Any] | None:
  """The largest relative gain of `group` over (init, K) whose typical
  users' detection rate falls by at most `max_drop` (absolute)."""
  base = personal['global'][ks[0]]
  if group not in base:
    return None
  best = None
  for label, by_k in personal.items():
    for k in ks:
      if label == 'global' or group not in by_k[k]:
        continue
      typical_delta = (by_k[k]['typical']['detection_rate'] -
                       base['typical']['detection_rate'])
      if typical_delta < -max_drop:
        continue
      gain = personalize.relative_gain(by_k[k][group]['detection_rate'],
                                       base[group]['detection_rate'])
      if best is None or gain > best['relative_gain']:
        best = {'relative_gain': gain, 'method': label, 'k': k,
                'baseline_detection_rate': base[group]['detection_rate'],
                'detection_rate': by_k[k][group]['detection_rate'],
                'detection_rate_sem': by_k[k][group].get(
                    'detection_rate_sem'),
                'typical_delta': typical_delta}
  return best


def paired_difference(a, b) -> dict[str, float]:
  """Mean of a - b over paired users, its standard error and n."""
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return {'diff': float(diff.mean()),
          'se': personalize.standard_error(diff), 'n': int(len(diff))}


def meta_vs_finetune(per_user: Mapping[str, Any], names, k: int,
                     plain: str = PLAIN_FINETUNE) -> dict[str, Any]:
  """Each meta-learned init against plain fine-tuning at K = k, paired over
  the same users (per-user detection rates); 'best' is the init with the
  largest mean difference."""
  if plain not in per_user or k not in per_user[plain]:
    return {}
  out = {name: paired_difference(per_user[name][k], per_user[plain][k])
         for name in names if name in per_user and k in per_user[name]}
  if out:
    best = max(out, key=lambda name: out[name]['diff'])
    out['best'] = dict(out[best], init=best, versus=plain, k=k)
  return out


def meta_vs_plain(personal: Mapping[str, Any], names) -> dict[str, Any]:
  """{'<name>/K=<k>/<group>': meta and plain fine-tuning detection rates}."""
  versus = {}
  for name in names:
    for k in VERSUS_KS:
      if k not in personal[PLAIN_FINETUNE] or name not in personal:
        continue
      for group in ('outlier', 'worst', 'typical', 'all'):
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
  groups = [g for g in ('typical', 'outlier', 'worst')
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
  for group in GROUPS:
    best = g.get(f'best_{group}_gain')
    if best:
      lines.append(
          f'- best relative detection-rate gain, {group} users, K <= '
          f'{config.report.max_k}: **{best["relative_gain"]:+.1%}** '
          f'({best["method"]}, K={best["k"]}: '
          f'{best["baseline_detection_rate"]:.3f} -> '
          f'{best["detection_rate"]:.3f})')
  for group in ('outlier', 'worst'):
    kept = g.get(f'best_{group}_gain_typical_kept')
    if kept:
      lines.append(
          f'- best gain for {group} users with typical users losing at most '
          f'{TYPICAL_DROP:.0%} (absolute): **{kept["relative_gain"]:+.1%}** '
          f'({kept["method"]}, K={kept["k"]}: '
          f'{kept["baseline_detection_rate"]:.3f} -> '
          f'{kept["detection_rate"]:.3f}; typical '
          f'{kept["typical_delta"]:+.3f})')
  best = g.get('meta_vs_finetune_k1', {}).get('best')
  if best:
    lines.append(
        f'- best meta-learned init vs plain fine-tuning at K=1, paired over '
        f'{best["n"]} users: {best["init"]} {best["diff"]:+.3f} '
        f'(s.e. {best["se"]:.3f}, {best["diff"] / max(best["se"], 1e-12):.1f}'
        ' s.e.)')
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
      for group in ('typical', 'outlier', 'worst'):
        if group in groups:
          row[f'{group} DR'] = groups[group]['detection_rate']
          row[f'{group} DR sem'] = groups[group].get('detection_rate_sem',
                                                     float('nan'))
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
