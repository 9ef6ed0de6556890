r"""The outlier study's measured goals, from a finished few-shot run.

The study (README "Outlier users") is `experiments.few_shot` on
`configs/few_shot_kws.py:backbone=ds_cnn_s,outliers`: a group-norm DS-CNN S
pre-trained on the seen speakers of the multi-engine population
'mixed_unseen', personalised from K = 1, 3, 5 enrollment clips per keyword
by fine-tuning (full, bias-only) and from meta-learned inits (Reptile,
FO-MAML, ANIL; any of `few_shot.meta_learners` by config), for typical,
unseen and worst users. This script reads that run's
results.json and writes the goals as results.json, results.md and the plot
of detection rate against K per group:

    python -m experiments.few_shot \
        --config=configs/few_shot_kws.py:backbone=ds_cnn_s,outliers \
        --workdir=/tmp/outliers
    python -m benchmarks.outliers --run=/tmp/outliers \
        --out=benchmarks/results/outliers/results.json

Top-level keys: `global_typical_accuracy` (held-out speakers of the seen
families and conditions), `outlier_unseen_gain_k5` and
`outlier_worst_gain_k5` (the largest relative detection-rate gain at 5% FAR
over the unadapted global model at K <= 5 among adaptations that cost
typical users at most one point, and the unconstrained largest),
`typical_delta_k5`, `meta_vs_finetune_k1` (the best meta-learned init
against plain fine-tuning at K = 1, paired over every scored user) and
`clips_per_second` (per engine, from benchmarks/results/synthesis).

Fine-tuning and meta-learning need not share one run: `--versus_run` takes
the meta-learned inits' comparison from another run of the same users and
global model (e.g. one that meta-trains with an inner loop the size of its
fine-tuning, while --run fine-tunes longer); each comparison records the
adaptation setting it was measured with.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

from absl import flags
from benchmarks import cli
from benchmarks import outputs

FLAGS = flags.FlagValues()
_RUN = flags.DEFINE_string('run', '/tmp/outliers',
                           'Work directory of the finished few-shot run.',
                           flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', 'benchmarks/results/outliers/results.json',
                           'JSON path; results.md and the plot go beside it.',
                           flag_values=FLAGS)
_VERSUS_RUN = flags.DEFINE_string(
    'versus_run', '', 'Work directory of the run whose meta-learned inits '
    'are compared with fine-tuning (same users and global model as --run); '
    'empty: --run.', flag_values=FLAGS)
_SYNTHESIS = flags.DEFINE_string(
    'synthesis', 'benchmarks/results/synthesis/results.json',
    'The synthesis throughput benchmark (clips per second per engine).',
    flag_values=FLAGS)
GAIN_GOAL = 0.3
SE_GOAL = 2.0


def _gain(goals: Mapping[str, Any], group: str) -> dict[str, Any] | None:
  kept = goals.get(f'best_{group}_gain_typical_kept')
  best = goals.get(f'best_{group}_gain')
  if not kept and not best:
    return None
  out = dict(kept or {})
  out['goal_met'] = bool(kept) and kept['relative_gain'] >= GAIN_GOAL
  out['unconstrained'] = best
  return out


def _typical_delta(personal: Mapping[str, Any], gain) -> dict[str, Any]:
  """Typical users' detection-rate change for every (init, K <= 5)."""
  base = personal['global']
  first = min(base, key=int)
  table = {}
  for label, by_k in personal.items():
    for k, groups in by_k.items():
      if label != 'global' and int(k) <= 5 and 'typical' in groups:
        table[f'{label}/K={k}'] = (groups['typical']['detection_rate'] -
                                   base[first]['typical']['detection_rate'])
  chosen = gain['typical_delta'] if gain and 'typical_delta' in gain else None
  return {'for_unseen_gain_method': chosen, 'by_method': table}


def _adaptation(results: Mapping[str, Any]) -> dict[str, Any]:
  """The run's fine-tuning setting (its config.personalize)."""
  cfg = results['config']['personalize']
  return {'learning_rate': cfg.get('learning_rate'),
          'num_steps': cfg.get('num_steps')}


def check_same_study(results: Mapping[str, Any],
                     versus: Mapping[str, Any]) -> None:
  """Raises ValueError unless both runs scored the same users from the same
  global model (so their comparisons can be reported side by side)."""
  for name, get in (('users', lambda r: r['users']['users']),
                    ('groups', lambda r: r['users']['groups']),
                    ('global model accuracy',
                     lambda r: r['global_model'].get('test_accuracy'))):
    if get(results) != get(versus):
      raise ValueError(f'--versus_run is not the same study as --run: its '
                       f'{name} differ.')


def _versus(versus_results: Mapping[str, Any]) -> dict[str, Any]:
  versus = versus_results['goals'].get('meta_vs_finetune_k1', {})
  best = dict(versus.get('best', {}))
  if best:
    best['ahead_by_2se'] = best['diff'] >= SE_GOAL * best['se'] > 0
  best['adaptation'] = _adaptation(versus_results)
  best['per_init'] = {k: v for k, v in versus.items() if k != 'best'}
  return best


def summarise(results: Mapping[str, Any], synthesis: Mapping[str, Any],
              versus_results: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
  """The goals of the study from a few-shot run's results.json.

  Args:
    results: the run's results.json.
    synthesis: benchmarks/results/synthesis's results.json ({}: none).
    versus_results: another run's results.json to take the meta-learned
      inits' comparison from (None: `results`); it must score the same
      users from the same global model.
  """
  if versus_results is None:
    versus_results = results
  else:
    check_same_study(results, versus_results)
  goals, personal = results['goals'], results['personalisation']
  unseen = _gain(goals, 'outlier')
  return {
      'global_typical_accuracy': results['global_model'].get(
          'test_accuracy'),
      'outlier_unseen_gain_k5': unseen,
      'outlier_worst_gain_k5': _gain(goals, 'worst'),
      'typical_delta_k5': _typical_delta(personal, unseen),
      'meta_vs_finetune_k1': _versus(versus_results),
      'adaptation': _adaptation(results),
      'clips_per_second': {
          'engine_only': synthesis.get('clips_per_second'),
          'full_chain': synthesis.get('full_chain'),
          'measured': synthesis.get('date')},
      'num_users': {g: len(v) for g, v in results['users']['groups'].items()},
      'population': {
          'name': results['config']['data'].get('population'),
          'corpus_speakers': results['config']['data'].get('num_speakers'),
          'first_user_index': results['config']['users'].get('first_index'),
          'speakers': results.get('speakers')},
      'far': results['config']['far'],
      'run_seconds': results.get('seconds'),
      'detection_rate': {label: {str(k): {g: v['detection_rate']
                                          for g, v in groups.items()}
                                 for k, groups in by_k.items()}
                         for label, by_k in personal.items()},
  }


def _gain_line(name: str, gain) -> str:
  if not gain:
    return f'- {name}: not measured'
  line = (f'- {name}: **{gain.get("relative_gain", float("nan")):+.1%}** '
          f'({gain.get("method")}, K={gain.get("k")}: '
          f'{gain.get("baseline_detection_rate", float("nan")):.3f} -> '
          f'{gain.get("detection_rate", float("nan")):.3f}, typical '
          f'{gain.get("typical_delta", float("nan")):+.3f}); goal '
          f'+{GAIN_GOAL:.0%} with typical users within 1 point: '
          f'**{"met" if gain["goal_met"] else "missed"}**')
  free = gain.get('unconstrained')
  if free:
    line += (f'. Largest gain at any cost to typical users: '
             f'{free["relative_gain"]:+.1%} ({free["method"]}, '
             f'K={free["k"]})')
  return line


def _population_line(population: Mapping[str, Any] | None) -> str:
  if not population:
    return ''
  speakers = population.get('speakers') or {}
  return (f'Population {population.get("name")!r}: a corpus of '
          f'{population.get("corpus_speakers")} speakers '
          f'({speakers.get("pretrain")} in pre-training, '
          f'{speakers.get("meta_train")} meta-training, '
          f'{speakers.get("test")} held out for the global model\'s test); '
          f'new users from speaker index '
          f'{population.get("first_user_index")}.\n')


def _setting(adaptation: Mapping[str, Any] | None) -> str:
  if not adaptation:
    return ''
  return (f' (SGD {adaptation["learning_rate"]:g} x '
          f'{adaptation["num_steps"]} steps)')


def markdown(summary: Mapping[str, Any]) -> str:
  versus = summary['meta_vs_finetune_k1']
  lines = ['# Outlier users: few-shot personalisation on the multi-engine '
           'population', '',
           _population_line(summary.get('population')),
           f'Users per group: {summary["num_users"]}; detection rate at '
           f'{summary["far"]:.0%} FAR on each user\'s own evaluation clips; '
           f'fine-tuning{_setting(summary.get("adaptation"))}.',
           '', '## Goals', '',
           f'- global model, held-out typical speakers: '
           f'**{summary["global_typical_accuracy"]:.3f}** (goal 0.90: '
           f'{"met" if summary["global_typical_accuracy"] >= 0.9 else "missed"})',
           _gain_line('unseen users', summary['outlier_unseen_gain_k5']),
           _gain_line('worst users', summary['outlier_worst_gain_k5'])]
  if versus.get('init'):
    lines.append(
        f'- best meta-learned init vs plain fine-tuning at K=1 over '
        f'{versus["n"]} users: {versus["init"]} {versus["diff"]:+.4f} '
        f'(s.e. {versus["se"]:.4f}){_setting(versus.get("adaptation"))}; '
        f'a lead of 2 s.e.: '
        f'**{"met" if versus["ahead_by_2se"] else "missed"}**')
  rows = [{'init+adaptation': label, 'K': k,
           **{f'{g} DR': v for g, v in groups.items()}}
          for label, by_k in summary['detection_rate'].items()
          for k, groups in by_k.items()]
  from ondevice import metric_writer  # pylint: disable=g-import-not-at-top
  lines += ['', '## Detection rate by init, K and group', '',
            metric_writer.markdown_table(rows), '',
            '![detection rate against K](detection_vs_k.png)', '']
  return '\n'.join(lines)


def _load(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{os.path.dirname(path)} has no results.json: run experiments.'
        'few_shot there first (see this script\'s docstring).')
  with open(path) as f:
    return json.load(f)


def main(argv):
  del argv
  path = os.path.join(_RUN.value, 'results.json')
  results = _load(path)
  versus = None
  if _VERSUS_RUN.value:
    versus = _load(os.path.join(_VERSUS_RUN.value, 'results.json'))
  synthesis = {}
  if os.path.exists(_SYNTHESIS.value):
    with open(_SYNTHESIS.value) as f:
      synthesis = json.load(f)
  summary = summarise(results, synthesis, versus)
  outputs.write(_OUT.value, summary, markdown(summary))
  plot = os.path.join(_RUN.value, 'detection_vs_k.png')
  if os.path.exists(plot):
    shutil.copy(plot, os.path.join(os.path.dirname(_OUT.value),
                                   'detection_vs_k.png'))


if __name__ == '__main__':
  cli.run(main, FLAGS)
