"""The few-shot keyword-spotting experiment: `run(config, workdir)`.

1. Split the training speakers into a pre-training pool and a meta-training
   pool, and train the global keyword spotter on the former
   (`central.pretrain`: resumed from its checkpoint, reused when done).
   Meta-training on the speakers the global model was fitted to gives no
   adaptation signal (their query loss is already near zero), so the pools
   are disjoint; a second global model trained on all training speakers
   ('global_all') is the same-data baseline.
2. Meta-train personalisation initialisations from the global model (the
   learners of `few_shot.meta_learners`, by name) on enrollment tasks of the
   meta-training speakers: K utterances per keyword as support, all of the
   speaker's other utterances as query.
3. Personalise every initialisation to new users (typical and outlier
   accents, never seen before; `ondevice.user_corpus`) from K enrollment
   utterances per keyword, and measure the keyword detection rate at a
   fixed false-accept rate on each user's other utterances.
4. The keyword-split N-way K-shot benchmark (`meta_training`).
5. Write results.json, report.md and detection_vs_k.png (`report`).

See configs/few_shot_kws.py for the fields and the command line.
"""
from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from central import pretrain
from central import supervised
from few_shot import config_checks
from few_shot import enrollment
from few_shot import meta_learners
from few_shot import meta_training
from few_shot import personalize
from few_shot import report
from few_shot import user_groups
from ondevice import train
from ondevice import user_corpus
from ondevice.data import base
from ondevice.data import registry
import quantized_training
import sparse_updates

Datasets = tuple[base.ArrayDataset, base.ArrayDataset]
# label -> (initial state, adaptation rule)
Inits = dict[str, tuple[Any, personalize.AdaptFn]]


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that needs no data (`few_shot.config_checks`), then
  the global model's config as `central.supervised` will."""
  config_checks.validate(config)
  try:
    supervised.validate_config(pretrain_config(config))
  except ValueError as e:
    raise ValueError(f'config.pretrain (with the data, model, norm, quant '
                     f'and seed it trains): {e}') from e


class Setup(NamedTuple):
  """What every stage shares: the model, its loss and the speaker pools."""
  model: Any
  loss_fn: train.LossFn
  keywords: np.ndarray      # Keyword class indices.
  pre_ds: base.ArrayDataset   # Speakers of the global model.
  meta_ds: base.ArrayDataset  # Speakers of meta-training (= pre_ds if none).
  num_classes: int


def run(config: ml_collections.ConfigDict, workdir: str, *,
        datasets: Datasets | None = None,
        users: base.ArrayDataset | None = None) -> dict[str, Any]:
  """Runs the experiment; returns (and writes) the results dict.

  Args:
    config: see configs/few_shot_kws.py.
    workdir: output folder; the global models and meta-training resume from
      checkpoints there.
    datasets: normalised (train, test) splits to use instead of loading
      `config.data` (tests pass small synthetic ones).
    users: normalised personalisation users (keyword clips) instead of
      synthesising `config.users`; needs meta['is_outlier_accent'].
  """
  validate_config(config)
  quant = quantized_training.get_quant(config.quant)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  train_ds, test_ds = datasets or registry.load_dataset(config.data)
  setup = build_setup(config, train_ds, quant)
  global_models = train_global_models(config, workdir, setup, train_ds,
                                      test_ds)
  inits = baseline_inits(config, global_models, setup)
  replay = replay_buffer(config, setup)
  meta_inits, timings = meta_train_all(config, workdir, setup,
                                       global_models['global'], replay)
  inits.update(meta_inits)
  users = (load_users(config, setup, global_models['global'], train_ds)
           if users is None else given_users(users))
  personal, user_info = personalise(config, setup, inits, users, replay)
  keyword_split = keyword_split_benchmark(config, workdir, train_ds, test_ds,
                                          quant)
  results = {
      'config': config.to_dict(),
      'global_model': global_models['global'].metrics,
      'global_models': {k: v.metrics for k, v in global_models.items()},
      'speakers': speaker_counts(config, setup, test_ds),
      'meta_training': timings, 'personalisation': personal,
      'users': user_info, 'keyword_split': keyword_split,
      'goals': report.goals(personal, config, user_info['detection_rate']),
      'seconds': time.time() - start}
  report.write(results, config, workdir)
  return results


def keyword_labels(words, class_names) -> np.ndarray:
  """Class indices of `words` (config.keywords) in the corpus."""
  missing = [w for w in words if w not in class_names]
  if missing:
    raise ValueError(f'config.keywords {missing} are not words of the corpus '
                     f'{class_names}.')
  return np.array([class_names.index(w) for w in words], np.int32)


def speaker_pools(config, train_ds: base.ArrayDataset
                  ) -> tuple[base.ArrayDataset, base.ArrayDataset]:
  """(pre-training speakers, meta-training speakers); disjoint when any
  meta-learner runs or config.meta.hold_out_speakers is set (so a
  fine-tuning-only run pre-trains on the same speakers as a meta-learning
  one and can share its global model), else both are every training
  speaker."""
  if not (config.meta.names or config.meta.get('hold_out_speakers', False)):
    return train_ds, train_ds
  return base.split_by_client(train_ds, config.meta.speaker_fraction,
                              config.data.split_seed + 1)


def pretrain_config(config) -> ml_collections.ConfigDict:
  """The global model's `central.supervised` config: config.pretrain with
  the data, model (and its kwargs and quant mode), norm and seed."""
  out = ml_collections.ConfigDict(config.pretrain.to_dict())
  out.data = config.data
  out.model = config.model
  out.model_kwargs = config.model_kwargs
  out.norm = config.norm
  out.quant = config.quant
  out.seed = config.seed
  return out


def build_setup(config, train_ds: base.ArrayDataset,
                quant: quantized_training.QuantSpec) -> Setup:
  """The model (with the quant mode's layers), its loss and the pools."""
  model = supervised.build_model(pretrain_config(config),
                                 train_ds.num_classes, quant.model_kwargs())
  pre_ds, meta_ds = speaker_pools(config, train_ds)
  return Setup(model=model, loss_fn=train.classification_loss(model),
               keywords=keyword_labels(config.keywords, train_ds.class_names),
               pre_ds=pre_ds, meta_ds=meta_ds,
               num_classes=train_ds.num_classes)


def train_global_model(config, workdir: str,
                       datasets: Datasets) -> pretrain.Pretrained:
  """The global keyword spotter on `datasets` (`central.pretrain`): a
  finished run in `workdir` is reused, an interrupted one resumed."""
  return pretrain.pretrain(pretrain_config(config), os.path.dirname(workdir),
                           datasets=datasets, workdir=workdir)


def train_global_models(config, workdir: str, setup: Setup,
                        train_ds: base.ArrayDataset,
                        test_ds: base.ArrayDataset
                        ) -> dict[str, pretrain.Pretrained]:
  """{'global': on the pre-training pool, 'global_all' (optional): on every
  training speaker}."""
  out = {'global': train_global_model(
      config, os.path.join(workdir, 'global'), (setup.pre_ds, test_ds))}
  if config.meta.names and config.meta.all_speakers_baseline:
    out['global_all'] = train_global_model(
        config, os.path.join(workdir, 'global_all'), (train_ds, test_ds))
  return out


def finetune_adapters(config, setup: Setup, params) -> dict[str, Any]:
  """Plain fine-tuning of a global model with each trainable preset (and
  its arguments in config.personalize.trainable_kwargs)."""
  cfg = config.personalize
  out = {}
  for preset in cfg.trainable:
    kwargs = {k: v for k, v in cfg.trainable_kwargs[preset].items()
              if v is not None}
    scheme = sparse_updates.resolve(preset, params, **kwargs)
    optimizer = optax.sgd(cfg.learning_rate)
    if scheme.masks:
      optimizer = sparse_updates.masked_optimizer(optimizer, scheme.masks)
    out[f'finetune_{preset}'] = personalize.finetune_adapter(
        setup.loss_fn, optimizer, cfg.num_steps, scheme.paths)
  return out


def baseline_inits(config, global_models: dict[str, pretrain.Pretrained],
                   setup: Setup) -> Inits:
  """Every global model as it is, and fine-tuned with each preset."""
  inits = {}
  for prefix, glob in global_models.items():
    state = personalize.as_state(glob.params, glob.model_state)
    inits[prefix] = (state, personalize.no_adaptation())
    for label, adapt_fn in finetune_adapters(config, setup,
                                             glob.params).items():
      inits[f'{prefix}+{label}'] = (state, adapt_fn)
  return inits


def replay_buffer(config, setup: Setup) -> enrollment.ReplayBuffer | None:
  """Clips of the global model's own training speakers: what a device can
  ship next to the model, never the user's or a meta-training speaker's."""
  per_word = config.personalize.get('replay_per_word', 0)
  if not per_word:
    return None
  return enrollment.replay_buffer(setup.pre_ds.x, setup.pre_ds.y,
                                  setup.keywords, per_word, seed=config.seed)


def meta_train_all(config, workdir: str, setup: Setup,
                   glob: pretrain.Pretrained, replay
                   ) -> tuple[Inits, dict[str, Any]]:
  """Meta-trains every learner of config.meta.names from the global model.

  Returns:
    ({name: (meta-learned state, the learner's adaptation)}, {name: timing}).
  """
  meta_cfg = config.meta
  if not meta_cfg.names:
    return {}, {}
  table = enrollment.enrollment_table(
      setup.meta_ds.x, setup.meta_ds.y, setup.meta_ds.client_id,
      setup.keywords, pool_size=meta_cfg.train_k)
  # Meta-training supports get the same replay as enrollment, so that the
  # inner loop a learner is meta-trained for is the one it runs at test time.
  sample = lambda k: enrollment.with_replay(
      enrollment.sample_enrollment_tasks(
          table, k, num_tasks=meta_cfg.tasks_per_step,
          k_shot=meta_cfg.train_k), replay)
  key = jax.random.key(config.seed)
  inits, timings = {}, {}
  for index, name in enumerate(meta_cfg.names):
    learner = meta_learners.from_config(
        meta_cfg, name, setup.model, num_classes=setup.num_classes,
        key='config.meta', loss_fn=setup.loss_fn)
    state, timings[name] = meta_training.meta_train(
        learner, learner.init(glob.params, glob.model_state), sample,
        num_steps=meta_cfg.num_steps,
        key=jax.random.fold_in(key, 100 + index),
        log_every=meta_cfg.log_every,
        workdir=os.path.join(workdir, f'meta_{name}'), name=f'meta {name}',
        checkpoint_every=meta_cfg.checkpoint_every)
    inits[name] = (state, personalize.learner_adapter(learner))
  return inits, timings


def load_users(config, setup: Setup, glob: pretrain.Pretrained,
               train_ds: base.ArrayDataset) -> user_groups.Users:
  """config.users' new users in their groups (`few_shot.user_groups`); the
  global model screens the worst group's candidates."""
  state = personalize.as_state(glob.params, glob.model_state)
  return user_groups.load_users(config, setup.model, state, train_ds)


def given_users(users: base.ArrayDataset) -> user_groups.Users:
  """Users passed to `run`: groups from meta['is_outlier_accent']."""
  first_row = {int(s): i for i, s in
               reversed(list(enumerate(users.client_id)))}
  groups = {'typical': [], 'outlier': []}
  for speaker, row in sorted(first_row.items()):
    outlier = bool(users.meta['is_outlier_accent'][row])
    groups['outlier' if outlier else 'typical'].append(speaker)
  return user_groups.Users(users, {g: v for g, v in groups.items() if v}, {})


def enrollment_users(config, setup: Setup, users: user_groups.Users):
  """(enrollment table of the users, group name -> mask over its users)."""
  clips = users.clips
  table = enrollment.enrollment_table(
      clips.x, clips.y, clips.client_id, setup.keywords,
      pool_size=max(config.personalize.k_values))
  return table, user_groups.group_masks(users.groups,
                                        np.asarray(table.speakers))


def personalise(config, setup: Setup, inits: Inits,
                users: user_groups.Users, replay=None):
  """Detection metrics of every (init, adaptation) at every K.

  Args:
    replay: an `enrollment.ReplayBuffer` that joins every user's enrollment
      support, or None.

  Returns:
    ({label: {k: group summary}}, {'users', 'groups', 'detection_rate':
    {label: {k: per-user detection rates in 'users' order}}}).
  """
  table, masks = enrollment_users(config, setup, users)
  per_user_rates = {}
  key = jax.random.fold_in(jax.random.key(config.seed), 7)
  results = {}
  for label, (state, adapt_fn) in inits.items():
    evaluate = personalize.make_user_evaluator(setup.model, adapt_fn,
                                               config.far)
    results[label] = {}
    for k in config.personalize.k_values:
      tasks = enrollment.with_replay(
          enrollment.all_enrollment_tasks(table, key, k_shot=k), replay)
      per_user = personalize.evaluate_in_chunks(
          evaluate, state, tasks, jax.random.fold_in(key, k),
          config.personalize.eval_chunk)
      results[label][k] = personalize.groups_summary(per_user, masks)
      per_user_rates.setdefault(label, {})[k] = [
          float(r) for r in per_user['detection_rate']]
      logging.info('personalise %s K=%d: %s', label, k, {
          g: round(v['detection_rate'], 3)
          for g, v in results[label][k].items()})
  return results, {'users': [int(s) for s in np.asarray(table.speakers)],
                   'groups': users.groups, 'screening': users.screening,
                   'detection_rate': per_user_rates}


def keyword_split_benchmark(config, workdir: str,
                            train_ds: base.ArrayDataset,
                            test_ds: base.ArrayDataset,
                            quant: quantized_training.QuantSpec
                            ) -> dict[str, Any]:
  """`meta_training.keyword_benchmark` on config.keyword_split ({} if no
  learner is named)."""
  cfg = config.keyword_split
  if not cfg.names:
    return {}
  return meta_training.keyword_benchmark(
      cfg, train_ds, test_ds, model_name=config.model,
      model_kwargs={'norm': config.norm, **quant.model_kwargs(),
                    **cfg.model_kwargs.to_dict()},
      seed=config.seed, workdir=os.path.join(workdir, 'keyword_split'))


def speaker_counts(config, setup: Setup, test_ds: base.ArrayDataset
                   ) -> dict[str, int]:
  return {'pretrain': len(setup.pre_ds.clients()),
          'meta_train': (len(setup.meta_ds.clients()) if config.meta.names
                         else 0),
          'test': len(test_ds.clients())}
