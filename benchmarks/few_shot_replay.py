r"""Enrollment with replayed non-keyword clips vs keyword clips alone.

Plain fine-tuning on a user's K keyword clips raises the keyword scores of
that user's non-keywords too, so at a fixed 5% false-accept rate the
threshold climbs and detection gains little (report of issue 6). Here every
enrollment support set also holds `per_word` labelled clips of each
non-keyword word from the global model's own training speakers
(`few_shot.enrollment.with_replay`), and both are compared on the same
users, the same global model (configs/few_shot_kws.py, pre-training pool)
and the same evaluation utterances.

    python -m benchmarks.few_shot_replay \
        --out=benchmarks/results/few_shot_replay/results.json
    python -m benchmarks.few_shot_replay \
        --config=configs/few_shot_kws.py:backbone=ds_cnn_s \
        --workdir=/tmp/few_shot_replay_cnn --out=/tmp/cnn/results.json

`--config` is configs/few_shot_kws.py and takes the usual overrides (model,
pre-training schedule, users); its `personalize` block is not used: the
flags below choose the fine-tuning settings.

Writes results.json and results.md beside it.
"""
import json
import os
import time

from absl import flags
from absl import logging
import jax
import optax

from benchmarks import cli
from few_shot import enrollment
from few_shot import experiment
from few_shot import personalize
from ondevice.data import registry
import quantized_training
import sparse_updates

FLAGS = flags.FlagValues()
_CONFIG = cli.define_config(
    'configs/few_shot_kws.py', 'Few-shot experiment config.',
    flag_values=FLAGS)
_OUT = flags.DEFINE_string(
    'out', 'benchmarks/results/few_shot_replay/results.json', 'JSON path.',
    flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/few_shot_replay',
                               'Global-model checkpoints.', flag_values=FLAGS)
_PER_WORD = flags.DEFINE_list('per_word', ['0', '1', '2', '4'],
                              'Replayed clips per non-keyword word.',
                              flag_values=FLAGS)
_PRESETS = flags.DEFINE_list('trainable', ['full', 'bias_only'],
                             'Trainable presets to fine-tune.',
                             flag_values=FLAGS)
_SETTINGS = flags.DEFINE_list('lr_steps', ['0.01x5', '0.03x10'],
                              'Fine-tuning SGD rate x steps.',
                              flag_values=FLAGS)
_KS = flags.DEFINE_list('k', ['1', '5'], 'Enrollment utterances per keyword.',
                        flag_values=FLAGS)


def _prepare(config):
  """The global model, its fine-tuning loss and the users' enrollment table."""
  experiment.validate_config(config)
  quant = quantized_training.get_quant(config.quant)
  train_ds, test_ds = registry.load_dataset(config.data)
  setup = experiment.build_setup(config, train_ds, quant)
  glob = experiment.train_global_model(
      config, os.path.join(_WORKDIR.value, 'global'),
      (setup.pre_ds, test_ds))
  users = experiment.load_users(config, setup, glob, train_ds)
  table, masks = experiment.enrollment_users(config, setup, users)
  return setup, glob, table, masks['outlier']


def _row(summary, base_row, **fields):
  row = dict(fields)
  for group, stats in summary.items():
    row[group] = stats['detection_rate']
    row[f'{group}_far'] = stats['false_accept_rate']
    row[f'{group}_kw_acc'] = stats['keyword_accuracy']
    row[f'{group}_gain'] = personalize.relative_gain(
        stats['detection_rate'], base_row[group]['detection_rate'])
  logging.info('%s', row)
  return row


def _rows(config, setup, glob, table, is_outlier):
  """The global model's row, then one per preset x setting x replay x K."""
  state = personalize.as_state(glob.params, glob.model_state)
  key = jax.random.key(config.seed)

  def run(evaluate, replay, k):
    tasks = enrollment.with_replay(enrollment.all_enrollment_tasks(
        table, jax.random.fold_in(key, 7), k_shot=k), replay)
    per_user = personalize.evaluate_in_chunks(
        evaluate, state, tasks, jax.random.fold_in(key, k), 16)
    return personalize.group_summary(per_user, is_outlier)

  base_row = run(personalize.make_user_evaluator(
      setup.model, personalize.no_adaptation(), config.far), None, 1)
  rows = [{'method': 'global', 'k': 0, 'per_word': 0, **{
      g: base_row[g]['detection_rate'] for g in base_row}}]
  for preset in _PRESETS.value:
    paths = sparse_updates.resolve(preset, glob.params).paths
    for setting in _SETTINGS.value:
      lr, steps = setting.split('x')
      evaluate = personalize.make_user_evaluator(
          setup.model, personalize.finetune_adapter(
              setup.loss_fn, optax.sgd(float(lr)), int(steps), paths),
          config.far)
      for per_word in map(int, _PER_WORD.value):
        replay = (enrollment.replay_buffer(
            setup.pre_ds.x, setup.pre_ds.y, setup.keywords, per_word,
            seed=config.seed) if per_word else None)
        for k in map(int, _KS.value):
          rows.append(_row(run(evaluate, replay, k), base_row,
                           method=f'finetune_{preset}', lr=float(lr),
                           steps=int(steps), k=k, per_word=per_word))
  return rows


def _markdown(out) -> str:
  lines = ['# Enrollment with replayed non-keyword clips', '',
           f'Detection rate at {out["far"]:.0%} FAR, {out["num_users"]} '
           'users of configs/few_shot_kws.py; global model test accuracy '
           f'{out["global_test_accuracy"]:.3f}. Gain: relative to the '
           'global model without adaptation. per_word 0 = keyword clips '
           'only (the earlier procedure).', '',
           '| method | lr x steps | K | replay/word | outlier DR | outlier '
           'gain | outlier FAR | typical DR | typical gain |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in out['rows']:
    if r['method'] == 'global':
      lines.append(f'| global | - | - | - | {r["outlier"]:.3f} | - | - | '
                   f'{r["typical"]:.3f} | - |')
      continue
    lines.append(
        f'| {r["method"]} | {r["lr"]} x {r["steps"]} | {r["k"]} | '
        f'{r["per_word"]} | {r["outlier"]:.3f} | {r["outlier_gain"]:+.1%} | '
        f'{r["outlier_far"]:.3f} | {r["typical"]:.3f} | '
        f'{r["typical_gain"]:+.1%} |')
  lines += ['', f'Wall time {out["seconds"]:.0f} s.', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  start = time.time()
  config = _CONFIG.value
  setup, glob, table, is_outlier = _prepare(config)
  rows = _rows(config, setup, glob, table, is_outlier)
  out = {'global_test_accuracy': glob.metrics['test_accuracy'],
         'num_users': {'outlier': int(is_outlier.sum()),
                       'typical': int((~is_outlier).sum())},
         'far': config.far, 'rows': rows, 'seconds': time.time() - start}
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(_markdown(out))


if __name__ == '__main__':
  cli.run(main, FLAGS)
