r"""Personalised accuracy of federated and meta-learned inits at K = 5.

The held-out users and the central global model are the few-shot outlier
study's (configs/few_shot_kws.py:backbone=ds_cnn_s,outliers, run in
`--fewshot_workdir`): a group-norm DS-CNN S trained centrally on the seen
speakers of population 'mixed_unseen', and users in the groups 'typical',
'outlier' (unseen: a family or condition held out of pre-training) and
'worst' (screened on calibration clips).

1. Federated runs (`fedjax_ext.experiment.run`, configs/fed_personalize_kws.py)
   over the study's training speakers, each starting from the global model
   (`config.init`), with DP, secure aggregation and in-round personalisation
   off: 'fedavg', 'per_fedavg' and 'fed_reptile' in float32 training every
   leaf and sending float32 deltas, and 'per_fedavg_composed' (the config's
   int8 fwd+bwd with stochastic rounding, bias-only, int8 uplink). A run
   whose final_metrics.json exists is reused.
2. Every init is adapted per user on K enrollment clips per keyword (plus the
   study's replayed non-keyword clips) with the study's procedure (SGD at
   its rate and steps, every leaf, float32) and scored on the user's other
   clips: keyword accuracy and detection rate at the study's FAR. Inits:
   'global+finetune' (no rounds), 'fedavg+finetune', 'per_fedavg',
   'fed_reptile', 'central_<name>' (a centrally meta-learned init adapted
   by its learner's own rule) and 'central_<name>+finetune' (its params,
   plain fine-tuning), 'per_fedavg_composed' (adapted as on device: its
   int8 quant mode, its bias-only trainable set, the same rate and steps)
   and 'per_fedavg_composed+float_finetune' (its params, the float
   procedure). Every init sees the same users, tasks and keys (paired).
3. results.json (merged into the existing one, other keys kept):
   `personalized_k<K>` per init and group (mean and SE over users),
   `versus_fedavg_finetune` (paired differences on unseen, worst and their
   union), `composed_vs_float.accuracy_delta` (points, all users, K = 5)
   and `federated_runs`; results.md and personalized_k5.png beside it.

    python -m benchmarks.fed_personalize_k5 \
        --fewshot_workdir=/work/runs/outliers \
        --workdir=/work/runs/fed_personalize \
        --out=benchmarks/results/fed_personalize/results.json
    python -m benchmarks.fed_personalize_k5 --smoke \
        --fewshot_workdir=/tmp/fs_smoke --workdir=/tmp/fpk5_smoke

The results in benchmarks/results/fed_personalize were measured on the study
as it was configured before 2026-12-06 (200 corpus speakers, 4000 plain
pre-training steps, SGD 1e-3 x 5 steps; `personalized_setup` in its
results.json); the study config now defaults to the 600-speaker corpus, an
8000-step SpecAugment global model and SGD 1e-2 x 20 steps, so a rerun on
the old --fewshot_workdir stops with an error naming the global model's
step.

`--smoke` uses the smoke variants of both configs (the few-shot workdir must
hold a run of configs/few_shot_kws.py:outliers,smoke), enrolls users with 7
clips per keyword so K = 5 fits, and writes results under --workdir only.
"""
from __future__ import annotations

import copy
import datetime
import importlib
import json
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from benchmarks import cli
from benchmarks import outputs
from fedjax_ext import experiment as fed_experiment
from fedjax_ext import training
from few_shot import enrollment
from few_shot import experiment
from few_shot import personalize
from few_shot import report
from ondevice import checkpoint as checkpoint_lib
from ondevice import init_from
from ondevice import logs
from ondevice import metric_writer
from ondevice.data import registry
import quantized_training

FLAGS = flags.FlagValues()
_FEWSHOT_CONFIG = flags.DEFINE_string(
    'fewshot_config', 'configs/few_shot_kws.py:backbone=ds_cnn_s,outliers',
    'The few-shot study config (file:arg) run in --fewshot_workdir.',
    flag_values=FLAGS)
_FEWSHOT_WORKDIR = flags.DEFINE_string(
    'fewshot_workdir', '/work/runs/outliers',
    'Work directory of the few-shot study (global/, meta_<name>/).',
    flag_values=FLAGS)
_FED_CONFIG = flags.DEFINE_string(
    'fed_config', 'configs/fed_personalize_kws.py', 'Federated config.',
    flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string(
    'workdir', '/work/runs/fed_personalize',
    'One folder per federated run; per_user.json.', flag_values=FLAGS)
_OUT = flags.DEFINE_string(
    'out', 'benchmarks/results/fed_personalize/results.json',
    'results.json to merge into (ignored with --smoke: <workdir>/results).',
    flag_values=FLAGS)
_NUM_ROUNDS = flags.DEFINE_integer('num_rounds', 100, 'Federated rounds.',
                                   flag_values=FLAGS)
_COHORT = flags.DEFINE_integer('cohort_size', 0, 'Clients per round (0: '
                               "the config's).", flag_values=FLAGS)
_LOCAL_STEPS = flags.DEFINE_integer('local_steps', 0, 'Local steps per '
                                    "client (0: the config's).",
                                    flag_values=FLAGS)
_CLIENT_LR = flags.DEFINE_float(
    'client_learning_rate', 0.001,
    'Client SGD rate. From the pre-trained init the config\'s 0.05 (its '
    'rate from scratch) diverged within 8 local steps (batch loss 0.01 -> '
    '12); 0.01 blew the server model up at round 2 (train loss 10.3) and '
    '0.003 drifted (train loss 0.06 -> 1.6 in 9 rounds); 0.001 held.',
    flag_values=FLAGS)
_INITS = flags.DEFINE_list(
    'inits', [], 'Inits to evaluate (labels as in results.md); empty: all.',
    flag_values=FLAGS)
_K_VALUES = flags.DEFINE_list('k', ['1', '5'], 'Enrollment clips per keyword.',
                              flag_values=FLAGS)
_RUNS = flags.DEFINE_list('runs', ['fedavg', 'per_fedavg', 'fed_reptile',
                                   'per_fedavg_composed'],
                          'Federated runs (a subset for a partial rerun).',
                          flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Smoke sizes; writes only under '
                           '--workdir.', flag_values=FLAGS)

# Federated run -> (algorithm, composed?); float runs train and send every
# leaf in float32.
RUNS = {'fedavg': ('fedavg', False), 'per_fedavg': ('per_fedavg', False),
        'fed_reptile': ('fed_reptile', False),
        'per_fedavg_composed': ('per_fedavg', True)}
FEDAVG = 'fedavg+finetune'
METRICS = ('keyword_accuracy', 'detection_rate')
VERSUS = ('per_fedavg', 'fed_reptile')
HEADLINE_K = 5
SMOKE_UTTERANCES = 7  # 1 calibration + 5 enrollment + 1 evaluation.
_GROUP_LABELS = {'outlier': 'outlier (unseen)', 'all': 'all users'}


class Init(NamedTuple):
  """An initialisation, its adaptation rule and the model that scores it."""
  state: Any
  adapt_fn: personalize.AdaptFn
  model: Any
  note: str


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py:arg' -> configs.x.get_config('arg')."""
  path, _, arg = spec.partition(':')
  module = importlib.import_module(
      os.path.splitext(path)[0].replace('/', '.'))
  return module.get_config(arg or None)


def fewshot_config(spec: str, smoke: bool) -> ml_collections.ConfigDict:
  config = load_config(spec)
  if smoke:  # Enough clips per keyword for K = 5 plus one to score.
    config.users.utterances_per_word = SMOKE_UTTERANCES
  return config


def fed_config(base: ml_collections.ConfigDict, fs, run: str, init: str,
               sizes: Mapping[str, int]) -> ml_collections.ConfigDict:
  """`base` for one run: the study's data and model, started from `init`,
  no DP, secure aggregation or in-round personalisation."""
  algorithm, composed = RUNS[run]
  config = copy.deepcopy(base)
  config.data = ml_collections.ConfigDict(fs.data.to_dict())
  config.model, config.norm = fs.model, fs.norm
  config.model_kwargs = ml_collections.ConfigDict(fs.model_kwargs.to_dict())
  config.init = init
  config.client_learning_rate = _CLIENT_LR.value
  # Per-FedAvg's inner (personalisation) step: the study's fine-tuning rate.
  config.algorithm.per_fedavg.alpha = fs.personalize.learning_rate
  config.algorithm.name = algorithm
  config.personalize.enabled = False
  config.dp.enabled = False
  config.secure_aggregation.enabled = False
  if not composed:
    config.quant = 'none'
    config.trainable.name = 'full'
    config.compression.name = 'none'
  for key, value in sizes.items():
    if value:
      if key == 'local_steps':
        config.local.num_steps = value
      else:
        config[key] = value
  return config


def run_federated(configs: Mapping[str, ml_collections.ConfigDict],
                  workdir: str, datasets) -> dict[str, dict[str, Any]]:
  """Runs (or reuses) each federated run; its final metrics by name."""
  out = {}
  for name, config in configs.items():
    run_dir = os.path.join(workdir, name)
    final = os.path.join(run_dir, 'final_metrics.json')
    if not os.path.exists(final):
      logging.info('Federated run %s in %s.', name, run_dir)
      start = time.time()
      fed_experiment.run(config, run_dir, datasets=datasets)
      with open(os.path.join(run_dir, 'wall_seconds.json'), 'w') as f:
        json.dump({'wall_seconds': time.time() - start}, f)
    with open(final) as f:
      metrics = json.load(f)
    wall = os.path.join(run_dir, 'wall_seconds.json')
    seconds = None
    if os.path.exists(wall):
      with open(wall) as f:
        seconds = json.load(f)['wall_seconds']
    out[name] = {'test_accuracy': metrics['test_accuracy'],
                 'rounds': metrics['rounds'],
                 'train_seconds': metrics['train_seconds'],
                 'wall_seconds': seconds, 'workdir': run_dir}
  return out


def finished_meta(config, workdir: str) -> tuple[str, ...]:
  """Meta-learners of the study whose run reached config.meta.num_steps."""
  done = []
  for name in config.meta.names:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, f'meta_{name}'))
    try:
      latest = ckpt.latest_step()
    finally:
      ckpt.close()
    if latest == config.meta.num_steps:
      done.append(name)
    else:
      logging.warning('meta_%s: checkpoint %s, not the final step %d; left '
                      'out.', name, latest, config.meta.num_steps)
  return tuple(done)


def central_meta_inits(config, workdir: str, setup, glob, replay,
                       finetune) -> dict[str, Init]:
  """Each finished meta-learned init: its own adaptation and plain
  fine-tuning of its params (restored; no meta-training step runs)."""
  names = finished_meta(config, workdir)
  if not names:
    return {}
  config = copy.deepcopy(config)
  config.meta.names = names
  meta, _ = experiment.meta_train_all(config, workdir, setup, glob, replay)
  out = {}
  for name, (state, adapt_fn) in meta.items():
    out[f'central_{name}'] = Init(state, adapt_fn, setup.model,
                                  f"{name}'s own adaptation rule")
    out[f'central_{name}+finetune'] = Init(
        state, finetune, setup.model, f'{name} params, plain fine-tuning')
  return out


def composed_init(fs, composed_config, setup, train_ds, params, model_state
                  ) -> Init:
  """The composed run's params adapted as on device: its quant mode and
  trainable set, the study's SGD rate and steps."""
  fs = copy.deepcopy(fs)
  fs.quant = composed_config.quant
  quant = quantized_training.get_quant(fs.quant)
  int8 = experiment.build_setup(fs, train_ds, quant)
  paths = training.trainable_from_config(composed_config, params)
  adapt = personalize.finetune_adapter(
      int8.loss_fn, optax.sgd(fs.personalize.learning_rate),
      fs.personalize.num_steps, paths)
  return Init(personalize.as_state(params, model_state), adapt, int8.model,
              f'{fs.quant}, trainable {composed_config.trainable.name}')


def build_inits(fs, fed_configs, workdir: str, setup, glob, replay,
                train_ds) -> dict[str, Init]:
  """Every init of the comparison (see the module docstring)."""
  cfg = fs.personalize
  finetune = personalize.finetune_adapter(
      setup.loss_fn, optax.sgd(cfg.learning_rate), cfg.num_steps, None)
  plain = 'float32 fine-tuning, every leaf'
  inits = {'global+finetune': Init(
      personalize.as_state(glob.params, glob.model_state), finetune,
      setup.model, plain)}
  for name in fed_configs:
    params, model_state, _ = init_from.load(
        os.path.join(workdir, name), glob.params, glob.model_state)
    state = personalize.as_state(params, model_state)
    if name == 'per_fedavg_composed':
      inits[name] = composed_init(fs, fed_configs[name], setup, train_ds,
                                  params, model_state)
      name += '+float_finetune'
    elif name == 'fedavg':
      name = FEDAVG
    inits[name] = Init(state, finetune, setup.model, plain)
  inits.update(central_meta_inits(fs, _FEWSHOT_WORKDIR.value, setup, glob,
                                  replay, finetune))
  if _INITS.value:
    unknown = sorted(set(_INITS.value) - set(inits))
    if unknown:
      raise ValueError(f'--inits {unknown} are not among {sorted(inits)}.')
    inits = {k: v for k, v in inits.items() if k in _INITS.value}
  return inits


def evaluate_inits(fs, setup, inits: Mapping[str, Init], table, replay,
                   k_values) -> dict[str, dict[int, dict[str, np.ndarray]]]:
  """Per-user metrics of every init at every K, on the study's tasks and
  keys (`experiment.personalise`), so all inits are paired."""
  key = jax.random.fold_in(jax.random.key(fs.seed), 7)
  out = {}
  for label, init in inits.items():
    evaluate = personalize.make_user_evaluator(init.model, init.adapt_fn,
                                               fs.far)
    out[label] = {}
    for k in k_values:
      tasks = enrollment.with_replay(
          enrollment.all_enrollment_tasks(table, key, k_shot=k), replay)
      per_user = personalize.evaluate_in_chunks(
          evaluate, init.state, tasks, jax.random.fold_in(key, k),
          fs.personalize.eval_chunk)
      out[label][k] = {m: np.asarray(per_user[m], np.float64)
                       for m in METRICS}
      logging.info('%s K=%d: keyword accuracy %.3f, detection rate %.3f',
                   label, k, out[label][k]['keyword_accuracy'].mean(),
                   out[label][k]['detection_rate'].mean())
  return out


def summarize(per_user: Mapping[str, np.ndarray],
              masks: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """{group: mean and SE of each metric, num_users}; 'all' added."""
  masks = dict(masks)
  masks['all'] = np.ones(len(per_user[METRICS[0]]), bool)
  out = {}
  for group, members in masks.items():
    members = np.asarray(members, bool)
    if not members.any():
      continue
    stats: dict[str, Any] = {}
    for metric in METRICS:
      values = np.asarray(per_user[metric], np.float64)[members]
      stats[metric] = float(values.mean())
      stats[metric + '_se'] = personalize.standard_error(values)
    stats['num_users'] = int(members.sum())
    out[group] = stats
  return out


def outlier_masks(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """'unseen' (the 'outlier' group), 'worst' and their union."""
  n = len(next(iter(masks.values())))
  unseen = np.asarray(masks.get('outlier', np.zeros(n, bool)), bool)
  worst = np.asarray(masks.get('worst', np.zeros(n, bool)), bool)
  return {'unseen': unseen, 'worst': worst, 'unseen_or_worst': unseen | worst}


def versus(per_user_k: Mapping[str, Mapping[str, np.ndarray]],
           masks: Mapping[str, np.ndarray], base: str = FEDAVG,
           names=VERSUS) -> dict[str, Any]:
  """Each of `names` minus `base`, paired over the users of each outlier
  set, per metric; ahead_by_2se when the mean difference over two or more
  users is positive and at least twice its standard error."""
  out = {}
  for name in names:
    if name not in per_user_k or base not in per_user_k:
      continue
    out[name] = {}
    for group, members in outlier_masks(masks).items():
      if not members.any():
        continue
      out[name][group] = {}
      for metric in METRICS:
        diff = report.paired_difference(per_user_k[name][metric][members],
                                        per_user_k[base][metric][members])
        diff['ahead_by_2se'] = bool(diff['n'] >= 2 and diff['diff'] > 0 and
                                    diff['diff'] >= 2 * diff['se'])
        out[name][group][metric] = diff
  return out


def accuracy_delta(per_user_k: Mapping[str, Mapping[str, np.ndarray]]
                   ) -> dict[str, Any] | None:
  """Composed minus float Per-FedAvg, keyword accuracy over all users, in
  points, with its paired SE."""
  if not {'per_fedavg', 'per_fedavg_composed'} <= set(per_user_k):
    return None
  diff = report.paired_difference(
      per_user_k['per_fedavg_composed']['keyword_accuracy'],
      per_user_k['per_fedavg']['keyword_accuracy'])
  return {'points': 100 * diff['diff'], 'se_points': 100 * diff['se'],
          'num_users': diff['n'],
          'within_2_points': bool(abs(100 * diff['diff']) <= 2)}


def assemble(per_user, masks, notes: Mapping[str, str],
             runs: Mapping[str, Any], existing: Mapping[str, Any]
             ) -> dict[str, Any]:
  """`existing` results with the personalised numbers filled in.

  Args:
    per_user: {init: {K: {metric: per-user values}}}, users in one order.
    masks: {group: bool mask over those users}.
    notes: {init: how it is adapted}.
    runs: the federated runs' final metrics.
    existing: the results.json being merged into (its keys are kept).
  """
  results = dict(existing)
  ks = sorted({k for by_k in per_user.values() for k in by_k})
  for k in ks:
    at_k = {label: by_k[k] for label, by_k in per_user.items() if k in by_k}
    block = {label: summarize(values, masks) for label, values in
             at_k.items()}
    block['versus_fedavg_finetune'] = versus(at_k, masks)
    results[f'personalized_k{k}'] = block
  composed = dict(results.get('composed_vs_float') or {})
  delta = accuracy_delta({label: by_k[HEADLINE_K] for label, by_k in
                          per_user.items() if HEADLINE_K in by_k})
  if delta is not None:
    composed['accuracy_delta'] = delta['points']
    composed['accuracy_delta_se'] = delta['se_points']
    composed['accuracy_delta_num_users'] = delta['num_users']
    composed['accuracy_delta_within_2_points'] = delta['within_2_points']
  results['composed_vs_float'] = composed
  results['personalization_notes'] = dict(notes)
  results['federated_runs'] = dict(runs)
  return results


def _fmt(stats: Mapping[str, Any], metric: str) -> str:
  return f'{stats[metric]:.3f} ± {stats[metric + "_se"]:.3f}'


def k_table(block: Mapping[str, Any], notes: Mapping[str, str]) -> str:
  rows = []
  for label, groups in block.items():
    if label == 'versus_fedavg_finetune':
      continue
    row = {'init': label, 'adaptation': notes.get(label, '')}
    for group, stats in groups.items():
      row[f'{group} kw acc'] = _fmt(stats, 'keyword_accuracy')
      row[f'{group} DR'] = _fmt(stats, 'detection_rate')
    rows.append(row)
  return metric_writer.markdown_table(rows)


def versus_table(block: Mapping[str, Any]) -> str:
  rows = []
  for name, groups in block.get('versus_fedavg_finetune', {}).items():
    for group, metrics in groups.items():
      for metric, d in metrics.items():
        rows.append({'init': name, 'users': group, 'metric': metric,
                     'diff': f'{d["diff"]:+.4f}', 'se': f'{d["se"]:.4f}',
                     'n': d['n'], 'ahead by 2 SE': d['ahead_by_2se']})
  return metric_writer.markdown_table(rows)


def markdown(results: Mapping[str, Any], ks) -> str:
  lines = ['# Personalised accuracy of federated and meta-learned inits', '',
           'Users and central global model of the few-shot outlier study; '
           'every init adapted on K clips per keyword (plus '
           f'{results["personalized_setup"]["replay_per_word"]} replayed '
           'clips per other word) and scored on the user\'s other clips; '
           f'mean ± SE over users. {results["personalized_date"]}.', '']
  for k in ks:
    block = results[f'personalized_k{k}']
    lines += [f'## K = {k}', '', k_table(block,
                                         results['personalization_notes']),
              '', f'Paired differences against {FEDAVG} (K = {k}):', '',
              versus_table(block), '']
  c = results['composed_vs_float']
  if c.get('accuracy_delta') is not None:
    lines += ['## Composed against float', '',
              f'Personalised keyword accuracy (all users, K = {HEADLINE_K}) '
              f'per_fedavg_composed minus per_fedavg: '
              f'{c["accuracy_delta"]:+.2f} ± {c["accuracy_delta_se"]:.2f} '
              f'points (paired SE, {c["accuracy_delta_num_users"]} users).',
              '']
  if 'bytes_ratio' in c:
    lines += [f'Costs composed / float32 (benchmarks.fed_personalize_costs): '
              f'bytes {c["bytes_ratio"]:.3f}, memory {c["memory_ratio"]:.3f}, '
              f'step time {c["step_time_ratio"]:.3f}.', '']
  if results.get('secagg_overhead'):
    lines += [f'Secure aggregation overhead per cohort: '
              f'{results["secagg_overhead"]}.', '']
  runs = [{'run': n, **{k: v for k, v in r.items() if k != 'workdir'}}
          for n, r in results['federated_runs'].items()]
  lines += ['## Federated runs', '', metric_writer.markdown_table(runs), '']
  return '\n'.join(lines)


def plot(block: Mapping[str, Any], path: str, k: int) -> None:
  """Bars per init and group, SE error bars; one panel per metric."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  inits = [label for label in block if label != 'versus_fedavg_finetune']
  groups = [g for g in ('typical', 'outlier', 'worst', 'all')
            if any(g in block[i] for i in inits)]
  fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(inits)), 8))
  width = 0.8 / len(groups)
  for ax, metric in zip(axes, METRICS):
    for j, group in enumerate(groups):
      xs = [i + j * width for i, label in enumerate(inits)
            if group in block[label]]
      stats = [block[label][group] for label in inits if group in block[label]]
      ax.bar(xs, [s[metric] for s in stats], width,
             yerr=[s[metric + '_se'] for s in stats], capsize=2,
             label=_GROUP_LABELS.get(group, group))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(inits))])
    ax.set_xticklabels(inits, rotation=30, ha='right', fontsize=7)
    ax.set_ylabel(metric.replace('_', ' '))
    ax.legend(fontsize=7)
  axes[0].set_title(f'Personalised at K = {k} (mean ± SE over users)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


SMOKE_SPECS = {'fewshot_config': 'configs/few_shot_kws.py:outliers,smoke',
               'fed_config': 'configs/fed_personalize_kws.py:smoke'}


def _flag(name: str, smoke: bool):
  """A flag's value; with --smoke, the smoke spec or size unless given."""
  given = FLAGS[name].present
  if smoke and not given:
    return SMOKE_SPECS.get(name, 0)  # 0: the smoke config's size.
  return FLAGS[name].value


def prepare(smoke: bool):
  """Both configs, checked before any data loads."""
  fs = fewshot_config(_flag('fewshot_config', smoke), smoke)
  fs.personalize.k_values = tuple(int(k) for k in _K_VALUES.value)
  experiment.validate_config(fs)
  base = load_config(_flag('fed_config', smoke))
  sizes = {'num_rounds': _flag('num_rounds', smoke),
           'cohort_size': _flag('cohort_size', smoke),
           'local_steps': _flag('local_steps', smoke)}
  init = os.path.join(_FEWSHOT_WORKDIR.value, 'global')
  steps = init_from.checkpoint_steps(init)
  if not steps or steps[0] != fs.pretrain.num_steps:
    # An unfinished global model would be trained on here, beside the study.
    raise ValueError(f'--fewshot_workdir={_FEWSHOT_WORKDIR.value!r}: its '
                     f'global model is at checkpoint {steps[:1]}, not the '
                     f'final step {fs.pretrain.num_steps}; let the few-shot '
                     'study finish its global model first.')
  fed = {}
  for name in _RUNS.value:
    if name not in RUNS:
      raise ValueError(f'--runs: {name!r} is not one of {sorted(RUNS)}.')
    fed[name] = fed_config(base, fs, name, init, sizes)
    fed_experiment.validate_config(fed[name])
  return fs, fed


def measure(fs, fed, workdir: str) -> tuple[dict, dict, dict, dict]:
  """(federated runs, per-user metrics by init and K, group masks, how
  each init adapts)."""
  train_ds, test_ds = registry.load_dataset(fs.data)
  setup = experiment.build_setup(fs, train_ds,
                                 quantized_training.get_quant(fs.quant))
  glob = experiment.train_global_model(
      fs, os.path.join(_FEWSHOT_WORKDIR.value, 'global'),
      (setup.pre_ds, test_ds))
  runs = run_federated(fed, workdir, (train_ds, test_ds))
  replay = experiment.replay_buffer(fs, setup)
  inits = build_inits(fs, fed, workdir, setup, glob, replay, train_ds)
  users = experiment.load_users(fs, setup, glob, train_ds)
  table, masks = experiment.enrollment_users(fs, setup, users)
  per_user = evaluate_inits(fs, setup, inits, table, replay,
                            fs.personalize.k_values)
  with open(os.path.join(workdir, 'per_user.json'), 'w') as f:
    json.dump({'users': [int(s) for s in np.asarray(table.speakers)],
               'groups': users.groups,
               'per_user': {label: {str(k): {m: v.tolist()
                                             for m, v in vals.items()}
                                    for k, vals in by_k.items()}
                            for label, by_k in per_user.items()}}, f)
  notes = {label: init.note for label, init in inits.items()}
  return runs, per_user, masks, notes


def study_check(results: Mapping[str, Any], fewshot_workdir: str
                ) -> dict[str, Any]:
  """'global+finetune' here against the study's own 'global+finetune_full'
  (same model, users, tasks and keys: the numbers should agree)."""
  path = os.path.join(fewshot_workdir, 'results.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    study = json.load(f)['personalisation'].get(report.PLAIN_FINETUNE, {})
  out = {}
  for key, block in results.items():
    if not key.startswith('personalized_k') or not block:
      continue
    k = key[len('personalized_k'):]
    if k in study and 'global+finetune' in block:
      out[k] = {m: {'study': study[k]['all'][m],
                    'here': block['global+finetune']['all'][m]}
                for m in METRICS}
  return out


def main(argv):
  del argv
  logs.setup_experiment_logging()
  start = time.time()
  smoke = _SMOKE.value
  fs, fed = prepare(smoke)
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  out = (os.path.join(workdir, 'results', 'results.json') if smoke
         else _OUT.value)
  existing_path = _OUT.value if os.path.exists(_OUT.value) else out
  existing = {}
  if os.path.exists(existing_path):
    with open(existing_path) as f:
      existing = json.load(f)
  runs, per_user, masks, notes = measure(fs, fed, workdir)
  results = assemble(per_user, masks, notes, runs, existing)
  results['personalized_date'] = datetime.datetime.now().isoformat(
      timespec='seconds')
  results['date'] = results.get('date', results['personalized_date'])
  results['personalized_seconds'] = time.time() - start
  results['personalized_setup'] = {
      'fewshot_config': _flag('fewshot_config', smoke),
      'fewshot_workdir': _FEWSHOT_WORKDIR.value,
      'fed_config': _flag('fed_config', smoke), 'workdir': workdir,
      'k_values': list(fs.personalize.k_values),
      'learning_rate': fs.personalize.learning_rate,
      'num_steps': fs.personalize.num_steps,
      'replay_per_word': fs.personalize.get('replay_per_word', 0),
      'far': fs.far}
  if not smoke:  # The smoke users have more clips than the study's.
    results['global_finetune_vs_study'] = study_check(
        results, _FEWSHOT_WORKDIR.value)
  ks = sorted(fs.personalize.k_values)
  outputs.write(out, results, markdown(results, ks))
  k = HEADLINE_K if HEADLINE_K in ks else ks[-1]
  plot(results[f'personalized_k{k}'],
       os.path.join(os.path.dirname(out), f'personalized_k{k}.png'), k)


if __name__ == '__main__':
  cli.run(main, FLAGS)
