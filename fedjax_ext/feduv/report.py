"""FedUV results: results.json, results.md, roc.png, goals, and merging runs.

`write_outputs` writes a run's rows (one per variant and reference, see
`variants.row_name`) and trial scores; `combine` merges runs of different
variants of the same config into one table, so variants can train in
separate processes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import numpy as np

from fedjax_ext import verification
from fedjax_ext.feduv import variants as variants_lib
from ondevice import metric_writer

# The comparison each report states: FedUV's EER at most this multiple of the
# federated softmax baseline's, and its TPR at FAR 10% above this value. They
# are the report's targets, computed from the rows, not training settings.
EER_RATIO_TARGET = 1.5
TPR_AT_FAR_10_TARGET = 0.8


def goals(rows: dict[str, dict]) -> list[dict[str, Any]]:
  """The report's targets, for every (FedUV, federated softmax) pair present.

  FedUV row `feduv{dp}{ref}` is compared with `fed_softmax{dp}`.
  """
  out = []
  for dp in ('', '_dp'):
    for ref in variants_lib.REFERENCE_SUFFIX.values():
      name = f'feduv{dp}{ref}'
      uv, sm = rows.get(name), rows.get('fed_softmax' + dp)
      if uv is None:
        continue
      if sm is not None:
        ratio = uv['eer'] / max(sm['eer'], 1e-12)
        out.append({'goal': f'EER({name}) <= {EER_RATIO_TARGET:g} x '
                            f'EER(fed_softmax{dp})',
                    'value': ratio, 'met': ratio <= EER_RATIO_TARGET})
      tpr = uv.get('tpr_at_far0.1')
      if tpr is not None:
        out.append({'goal': f'TPR@FAR10% ({name}) > '
                            f'{TPR_AT_FAR_10_TARGET:g}',
                    'value': tpr, 'met': tpr > TPR_AT_FAR_10_TARGET})
  return out


def results(config_json: dict[str, Any], code, splits,
            rows: dict[str, dict]) -> dict[str, Any]:
  """The content of results.json for the rows trained so far."""
  return {
      'code': {'n': code.n, 'k': code.k, 't': code.t,
               'min_distance_lower_bound': code.designed_distance},
      'num_users': splits.num_users,
      'num_unseen_speakers': len(splits.unseen_speakers),
      'utterances': {k: len(getattr(splits, k))
                     for k in ('train', 'warmup', 'test', 'unseen')},
      'variants': rows, 'goals': goals(rows), 'config': config_json,
  }


def plot_roc(trials_by_row: dict[str, dict], path: str) -> str:
  """ROC curves of every row on a log FAR axis; returns `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  for name, trials in trials_by_row.items():
    far, tpr, _ = verification.roc_curve(trials['genuine'],
                                         trials['impostor'])
    # A million points draw slowly: the best TPR at each FAR of a grid.
    grid = np.logspace(-4, 0, 300)
    ax.plot(grid, tpr[np.searchsorted(far, grid, side='right') - 1],
            label=name)
  ax.set_xscale('log')
  ax.set_xlim(1e-4, 1)
  ax.set_xlabel('false accept rate (all impostors)')
  ax.set_ylabel('true positive rate')
  ax.axvline(0.01, color='grey', lw=0.5, ls=':')
  ax.axvline(0.1, color='grey', lw=0.5, ls=':')
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right')
  ax.set_title('Speaker verification ROC, unseen-utterance trials')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def json_safe(value: Any) -> Any:
  """`value` with non-finite floats as the strings 'inf', '-inf', 'nan'.

  JSON has no infinity (an epsilon without noise is infinite).
  """
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def save_trials(trials: dict[str, dict], workdir: str) -> None:
  """trials_<row>.npz of each row: genuine and impostor scores."""
  for name, row_trials in trials.items():
    np.savez_compressed(os.path.join(workdir, f'trials_{name}.npz'),
                        **row_trials)


def write_outputs(res: dict[str, Any], trials: dict[str, dict],
                  workdir: str) -> None:
  """results.json, roc.png and results.md in `workdir`."""
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(json_safe(res), f, indent=2, allow_nan=False)
  plot_roc(trials, os.path.join(workdir, 'roc.png'))
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown_report(res))


def _load_run(workdir: str) -> tuple[dict[str, Any], dict[str, dict]]:
  """(results.json, trials of each row) of a finished run."""
  with open(os.path.join(workdir, 'results.json')) as f:
    res = json.load(f)
  trials = {}
  for name in res['variants']:
    with np.load(os.path.join(workdir, f'trials_{name}.npz')) as z:
      trials[name] = {k: z[k] for k in z.files}
  return res, trials


def combine(workdirs: Iterable[str], out_dir: str) -> dict[str, Any]:
  """Merges runs of different variants (same data, code and seed) into one.

  Raises:
    ValueError: when the runs' configs differ in anything but `variants`.
  """
  workdirs = [str(d) for d in workdirs]
  merged, trials, reference = None, {}, None
  for d in workdirs:
    res, run_trials = _load_run(d)
    config = dict(res['config'], variants=None)
    if reference is None:
      reference, merged = config, dict(res, variants={})
    elif config != reference:
      diff = sorted(k for k in set(config) | set(reference)
                    if config.get(k) != reference.get(k))
      raise ValueError(f'Runs in {workdirs} differ in config keys {diff}; '
                       'only `variants` may differ.')
    merged['variants'].update(res['variants'])
    trials.update(run_trials)
  order = variants_lib.row_order(merged['variants'])
  merged['variants'] = {v: merged['variants'][v] for v in order}
  trials = {v: trials[v] for v in order}
  trained = {r.get('trained_as', n) for n, r in merged['variants'].items()}
  merged['config']['variants'] = ','.join(
      v for v in variants_lib.VARIANTS if v in trained)
  merged['goals'] = goals(merged['variants'])
  os.makedirs(out_dir, exist_ok=True)
  save_trials(trials, out_dir)  # So a merged run can itself be merged.
  write_outputs(merged, trials, out_dir)
  return merged


def _table_row(name: str, r: dict[str, Any], fars) -> dict[str, Any]:
  row = {'variant': name, 'EER': r['eer']}
  for far in fars:
    row[f'TPR@FAR{far:g}'] = r[f'tpr_at_far{far:g}']
  row.update({'EER unseen impostors': r['unseen_eer'],
              'warm-up TPR': r['warmup_threshold_tpr'],
              'warm-up FAR': r['warmup_threshold_far'],
              'epsilon': r.get('dp_epsilon', '-'),
              'delta': r.get('dp_delta', '-'),
              'shares class embeddings': r['shares_class_embeddings'],
              'train s': r['train_seconds']})
  return row


def markdown_report(res: dict[str, Any]) -> str:
  """results.md: the rows, how trials were formed, and the goals."""
  fars = res['config']['fars']
  rows = [_table_row(name, r, fars) for name, r in res['variants'].items()]
  code = res['code']
  lines = [
      '# FedUV vs softmax baselines: speaker verification',
      '',
      f"{res['num_users']} seen users (synthesised speakers), "
      f"{res['num_unseen_speakers']} unseen speakers as extra impostors; "
      f"BCH({code['n']},{code['k']}) codewords, t={code['t']}, d_min >= "
      f"{code['min_distance_lower_bound']}. Trials: every test (unseen) "
      'utterance of a seen user against every seen user, and every unseen '
      "speaker's utterance against every seen user. Warm-up: each user's "
      f"threshold for TPR {res['config']['target_tpr']} on its own "
      'warm-up utterances.',
      '', metric_writer.markdown_table(rows), '',
      '## Goals', '', metric_writer.markdown_table(res['goals']), ''
  ]
  return '\n'.join(lines)
