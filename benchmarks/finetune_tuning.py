r"""Fine-tuning rate and steps of the outlier study, chosen on validation users.

The study fine-tunes every user with `config.personalize.learning_rate` for
`config.personalize.num_steps` SGD steps. Those were chosen on the
meta-training speakers, who are of the families pre-training saw; an unseen
user may need a larger step. This script chooses them on *validation
users*: new speakers of the same population whose indices lie past every
user the study scores, so the choice never sees an evaluated user's clips.

For each (learning rate, steps) of the grid it fine-tunes the global model
(the study's, reused from --workdir/global) on K enrollment clips per
keyword of each validation user, and scores the detection rate at the
study's FAR on the user's own evaluation clips, per group (typical,
unseen). The choice maximises the unseen users' detection rate among the
settings that keep typical users within --typical_tolerance of the
unadapted model (the issue's constraint), and is then passed to the study
with --config.personalize.learning_rate / num_steps.

    python -m benchmarks.finetune_tuning \
        --config=configs/few_shot_kws.py:backbone=ds_cnn_s,outliers \
        --workdir=/tmp/outliers \
        --out=benchmarks/results/outliers/finetune_tuning.json

Writes the JSON, a markdown table and a plot (detection rate against the
learning rate, one line per steps and group) beside --out.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
import jax
import ml_collections

from benchmarks import cli
from benchmarks import outputs
from few_shot import experiment
from few_shot import personalize
from few_shot import user_groups
from ondevice.data import registry
import quantized_training

FLAGS = flags.FlagValues()
_CONFIG = cli.define_config(
    'configs/few_shot_kws.py:backbone=ds_cnn_s,outliers',
    'The study config (its global model, population and FAR).',
    flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string(
    'workdir', '/tmp/outliers', 'The study work directory: its global/ is '
    'reused (trained there if missing).', flag_values=FLAGS)
_OUT = flags.DEFINE_string(
    'out', '/tmp/finetune_tuning.json', 'JSON path; the markdown and plot '
    'go beside it.', flag_values=FLAGS)
_RATES = flags.DEFINE_list('learning_rates', ['0.001', '0.003', '0.01',
                                              '0.03'],
                           'SGD rates of the grid.', flag_values=FLAGS)
_STEPS = flags.DEFINE_list('steps', ['5', '20'], 'Step counts of the grid.',
                           flag_values=FLAGS)
_K = flags.DEFINE_integer('k', 5, 'Enrollment clips per keyword.',
                          flag_values=FLAGS)
_NUM_USERS = flags.DEFINE_integer('users_per_group', 32, 'Validation users '
                                  'of each group.', flag_values=FLAGS)
_TOLERANCE = flags.DEFINE_float(
    'typical_tolerance', 0.01, 'How far below unadapted the typical users\' '
    'detection rate may fall for a setting to be chosen.', flag_values=FLAGS)


def validation_config(config: ml_collections.ConfigDict,
                      users_per_group: int) -> ml_collections.ConfigDict:
  """`config` with its users replaced by validation users.

  They start past the last speaker the study scores (typical, unseen and
  every worst-group candidate), so no evaluated user is among them; there
  is no worst group (its screening would need calibration clips of its own).
  """
  evaluated = user_groups.pick(config)
  last = max(max(ids) for ids in evaluated.values() if ids)
  out = ml_collections.ConfigDict(config.to_dict())
  out.users.update(first_index=last + 1, num_typical=users_per_group,
                   num_outlier=users_per_group, worst_candidates=0)
  return out


def grid(rates: Sequence[str], steps: Sequence[str]
         ) -> list[tuple[float, int]]:
  """(learning rate, steps) pairs; every value positive."""
  pairs = [(float(r), int(s)) for r, s in itertools.product(rates, steps)]
  for rate, count in pairs:
    if rate <= 0 or count <= 0:
      raise ValueError(f'--learning_rates and --steps must be positive; got '
                       f'rate {rate}, steps {count}.')
  return pairs


def choose(rows: list[dict[str, Any]], baseline: dict[str, float],
           tolerance: float) -> dict[str, Any] | None:
  """The row of highest unseen-user detection rate whose typical users stay
  within `tolerance` of `baseline`'s; None if no row does."""
  kept = [r for r in rows
          if r['typical'] >= baseline['typical'] - tolerance]
  return max(kept, key=lambda r: r['outlier']) if kept else None


def _detection_rates(config, setup, users, state, adapt_fn
                     ) -> dict[str, float]:
  """Per-group detection rate at K = --k of `state` adapted by `adapt_fn`."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.personalize.k_values = (_K.value,)
  summary, _ = experiment.personalise(cfg, setup, {'init': (state, adapt_fn)},
                                      users,
                                      experiment.replay_buffer(cfg, setup))
  return {g: v['detection_rate'] for g, v in summary['init'][_K.value].items()}


def _finetune(config, setup, state, rate: float, steps: int):
  """Plain SGD on every weight: `rate`, `steps`."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.personalize.update(learning_rate=rate, num_steps=steps,
                         trainable=('full',))
  return experiment.finetune_adapters(cfg, setup,
                                      state.params)['finetune_full']


def measure(config, workdir: str) -> dict[str, Any]:
  """Every grid setting's detection rates on the validation users."""
  experiment.validate_config(config)
  start = time.time()
  train_ds, test_ds = registry.load_dataset(config.data)
  setup = experiment.build_setup(config, train_ds,
                                 quantized_training.get_quant(config.quant))
  glob = experiment.train_global_models(config, workdir, setup, train_ds,
                                        test_ds)['global']
  state = personalize.as_state(glob.params, glob.model_state)
  val_config = validation_config(config, _NUM_USERS.value)
  users = user_groups.load_users(val_config, setup.model, state, train_ds)
  baseline = _detection_rates(val_config, setup, users, state,
                              personalize.no_adaptation())
  logging.info('unadapted: %s', baseline)
  rows = []
  for rate, steps in grid(_RATES.value, _STEPS.value):
    scores = _detection_rates(val_config, setup, users, state,
                              _finetune(val_config, setup, state, rate, steps))
    rows.append({'learning_rate': rate, 'steps': steps, **scores})
    logging.info('lr %g, %d steps: %s', rate, steps, scores)
  return {'k': _K.value, 'far': config.far, 'baseline': baseline,
          'rows': rows, 'validation_users': users.groups,
          'first_validation_index': val_config.users.first_index,
          'study_setting': {
              'learning_rate': config.personalize.learning_rate,
              'steps': config.personalize.num_steps},
          'chosen': choose(rows, baseline, _TOLERANCE.value),
          'typical_tolerance': _TOLERANCE.value,
          'global_test_accuracy': glob.metrics.get('test_accuracy'),
          'seconds': time.time() - start}


def markdown(results: dict[str, Any]) -> str:
  base = results['baseline']
  lines = [
      '# Fine-tuning rate and steps, chosen on validation users', '',
      f"Detection rate at {results['far']:.0%} FAR, K = {results['k']} "
      'enrollment clips per keyword, plain SGD on every weight, on '
      f"validation users from speaker index "
      f"{results['first_validation_index']} (past every evaluated user); "
      f"{len(results['validation_users'].get('typical', []))} typical and "
      f"{len(results['validation_users'].get('outlier', []))} unseen users.",
      '', '| learning rate | steps | typical DR | unseen DR | unseen gain |',
      '|---|---|---|---|---|',
      f"| unadapted | 0 | {base['typical']:.3f} | {base['outlier']:.3f} | - |"]
  for row in results['rows']:
    gain = row['outlier'] / base['outlier'] - 1 if base['outlier'] else 0.0
    lines.append(f"| {row['learning_rate']:g} | {row['steps']} | "
                 f"{row['typical']:.3f} | {row['outlier']:.3f} | "
                 f'{gain:+.1%} |')
  chosen = results['chosen']
  study = results['study_setting']
  lines += ['', f"The study's setting: rate {study['learning_rate']:g}, "
            f"{study['steps']} steps."]
  lines.append(
      f"Chosen (typical users within {results['typical_tolerance']:g} of "
      f"unadapted): rate {chosen['learning_rate']:g}, {chosen['steps']} "
      'steps.' if chosen else 'No setting keeps typical users within the '
      'tolerance.')
  return '\n'.join(lines) + '\n'


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for group, style in (('typical', '-'), ('outlier', '--')):
    for steps in sorted({r['steps'] for r in results['rows']}):
      rows = [r for r in results['rows'] if r['steps'] == steps]
      ax.plot([r['learning_rate'] for r in rows], [r[group] for r in rows],
              style, marker='o',
              label=f"{'unseen' if group == 'outlier' else group}, {steps} "
              'steps')
    ax.axhline(results['baseline'][group], linestyle=style, color='grey',
               linewidth=0.8)
  ax.set_xscale('log')
  ax.set_xlabel('fine-tuning learning rate')
  ax.set_ylabel(f"detection rate at {results['far']:.0%} FAR")
  ax.set_title(f"Validation users, K = {results['k']} (grey: unadapted)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  results = measure(_CONFIG.value, _WORKDIR.value)
  outputs.write(_OUT.value, results, markdown(results))
  plot(results, os.path.splitext(_OUT.value)[0] + '.png')


if __name__ == '__main__':
  cli.run(main, FLAGS)
