"""The few-shot keyword-spotting experiment: `run(config, workdir)`.

1. Split the training speakers into a pre-training pool and a meta-training
   pool, and train the global keyword spotter on the former
   (`ondevice.supervised`, resumable from its checkpoint). Meta-training on
   the speakers the global model was fitted to gives no adaptation signal
   (their query loss is already near zero), so the pools are disjoint; a
   second global model trained on all training speakers ('global_all') is
   the same-data baseline.
2. Meta-train personalisation initialisations from the global model (MAML,
   FO-MAML, Reptile, ANIL, Meta-SGD, ProtoNets by name) on enrollment tasks
   of the meta-training speakers: K utterances per keyword as support, all
   of the speaker's other utterances as query.
3. Personalise every initialisation to new users (typical and outlier
   accents, never seen before) from K enrollment utterances per keyword,
   and measure the keyword detection rate at a fixed false-accept rate on
   each user's other utterances.
4. The keyword-split N-way K-shot benchmark (`meta_training`).
5. Write results.json, report.md and detection_vs_k.png (`report`).

See configs/few_shot_kws.py for the fields and the command line.
"""
from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from few_shot import enrollment
from few_shot import meta_learners
from few_shot import meta_training
from few_shot import personalize
from few_shot import report
from few_shot import user_corpus
from ondevice import supervised
from ondevice import train
from ondevice.data import base
from ondevice.data import registry
import quantized_training
import sparse_updates.presets
import sparse_updates.rules


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that need no data, before anything runs."""
  for key in ('data', 'model', 'norm', 'keywords', 'far', 'pretrain', 'users',
              'meta', 'personalize', 'keyword_split', 'seed'):
    if key not in config:
      raise ValueError(f'The config lacks config.{key}; start from '
                       'configs/few_shot_kws.py.')
  if config.norm == 'batch' and config.meta.names:
    raise ValueError("config.norm='batch' cannot be meta-learned (batch "
                     "statistics of a K-shot support set); use 'group', "
                     "'layer' or 'none'.")
  names = set(config.meta.names) | set(config.keyword_split.names)
  unknown = sorted(names - set(meta_learners.META_LEARNERS))
  if unknown:
    raise ValueError(f'Unknown meta-learners {unknown}; valid names are '
                     f'{meta_learners.META_LEARNERS}.')
  if not 0.0 <= config.far < 1.0:
    raise ValueError(f'config.far must lie in [0, 1); got {config.far}.')
  max_k = max(config.personalize.k_values)
  if min(config.personalize.k_values) < 1 or (
      max_k >= config.users.utterances_per_word):
    raise ValueError(
        f'config.personalize.k_values={tuple(config.personalize.k_values)} '
        'must lie in [1, config.users.utterances_per_word - 1] = [1, '
        f'{config.users.utterances_per_word - 1}].')
  if config.meta.train_k >= config.data.utterances_per_word:
    raise ValueError(
        f'config.meta.train_k={config.meta.train_k} must be below '
        f'config.data.utterances_per_word={config.data.utterances_per_word}.')
  for preset in config.personalize.trainable:
    if preset not in sparse_updates.presets.PRESETS:
      raise ValueError(f'config.personalize.trainable has {preset!r}; valid '
                       f'presets are {sparse_updates.presets.PRESETS}.')
  replay = config.personalize.get('replay_per_word', 0)
  if not isinstance(replay, int) or replay < 0:
    raise ValueError('config.personalize.replay_per_word must be an int >= 0 '
                     f'(0: enroll on keyword clips only); got {replay!r}.')
  quantized_training.get_quant(config.quant)


def _pretrain_config(config) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.pretrain.to_dict())
  out.data = config.data
  out.model = config.model
  out.norm = config.norm
  out.seed = config.seed
  return out


def _keyword_labels(words, class_names) -> np.ndarray:
  missing = [w for w in words if w not in class_names]
  if missing:
    raise ValueError(f'config.keywords {missing} are not words of the corpus '
                     f'{class_names}.')
  return np.array([class_names.index(w) for w in words], np.int32)


def _load_users(config, train_ds):
  cfg = config.users
  indices = user_corpus.select_users(config.data.corpus_seed, cfg.first_index,
                                     cfg.num_typical, cfg.num_outlier)
  users = user_corpus.load_users(indices, cfg.utterances_per_word,
                                 config.data.corpus_seed,
                                 config.data.get('cache_dir', None) or None)
  return user_corpus.normalise_like(users, train_ds)


def outlier_mask(users: base.ArrayDataset, speakers) -> np.ndarray:
  """Whether each of `speakers` (client ids of `users`) has an outlier
  accent, from users.meta['is_outlier_accent'] of its first utterance."""
  first_row = {int(s): i for i, s in
               reversed(list(enumerate(users.client_id)))}
  return np.array([bool(users.meta['is_outlier_accent'][first_row[int(s)]])
                   for s in speakers])


def _adapters(config, model, loss_fn, params) -> dict[str, Any]:
  """Plain fine-tuning of the global model with each trainable preset."""
  cfg = config.personalize
  out = {}
  for preset in cfg.trainable:
    paths = sparse_updates.rules.trainable_paths(
        params, sparse_updates.presets.get_rules(preset, params))
    out[f'finetune_{preset}'] = personalize.finetune_adapter(
        loss_fn, optax.sgd(cfg.learning_rate), cfg.num_steps, paths)
  return out


def _personalisation(config, model, loss_fn, inits, users, keywords, key,
                     replay=None):
  """Detection metrics of every (init, adaptation) at every K; `replay`
  (an `enrollment.ReplayBuffer`) joins every user's enrollment support."""
  table = enrollment.enrollment_table(
      users.x, users.y, users.client_id, keywords,
      pool_size=max(config.personalize.k_values))
  speakers = np.asarray(table.speakers)
  is_outlier = outlier_mask(users, speakers)
  results = {}
  for label, (state, adapt_fn) in inits.items():
    evaluate = personalize.make_user_evaluator(model, adapt_fn, config.far)
    results[label] = {}
    for k in config.personalize.k_values:
      tasks = enrollment.with_replay(
          enrollment.all_enrollment_tasks(table, key, k_shot=k), replay)
      per_user = personalize.evaluate_in_chunks(
          evaluate, state, tasks, jax.random.fold_in(key, k),
          config.personalize.eval_chunk)
      results[label][k] = personalize.group_summary(per_user, is_outlier)
      logging.info('personalise %s K=%d: %s', label, k, {
          g: round(v['detection_rate'], 3)
          for g, v in results[label][k].items()})
  return results, {'users': [int(s) for s in speakers],
                   'is_outlier': is_outlier.tolist()}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        datasets: tuple[base.ArrayDataset, base.ArrayDataset] | None = None,
        users: base.ArrayDataset | None = None) -> dict[str, Any]:
  """Runs the experiment; returns (and writes) the results dict.

  Args:
    config: see configs/few_shot_kws.py.
    workdir: output folder; the global models resume from checkpoints there.
    datasets: normalised (train, test) splits to use instead of loading
      `config.data` (tests pass small synthetic ones).
    users: normalised personalisation users instead of synthesising
      `config.users`; needs meta['is_outlier_accent'].
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  train_ds, test_ds = datasets or registry.load_dataset(config.data)
  keywords = _keyword_labels(config.keywords, train_ds.class_names)
  quant = quantized_training.get_quant(config.quant)
  model_kwargs = {**config.model_kwargs.to_dict(), **quant.model_kwargs()}

  meta_cfg = config.meta
  pre_ds, meta_ds = train_ds, train_ds
  if meta_cfg.names:
    pre_ds, meta_ds = base.split_by_client(train_ds, meta_cfg.speaker_fraction,
                                           config.data.split_seed + 1)
  glob = supervised.train_and_evaluate(
      _pretrain_config(config), os.path.join(workdir, 'global'),
      model_kwargs=model_kwargs, datasets=(pre_ds, test_ds))
  params = glob['state'].params
  model = supervised.build_model(_pretrain_config(config),
                                 train_ds.num_classes, model_kwargs)
  loss_fn = train.classification_loss(model)
  key = jax.random.key(config.seed)

  inits = {}
  global_models = {'global': glob}
  if meta_cfg.names and meta_cfg.all_speakers_baseline:
    global_models['global_all'] = supervised.train_and_evaluate(
        _pretrain_config(config), os.path.join(workdir, 'global_all'),
        model_kwargs=model_kwargs, datasets=(train_ds, test_ds))
  for prefix, out in global_models.items():
    state = personalize.as_state(out['state'].params,
                                 out['state'].model_state)
    inits[prefix] = (state, personalize.no_adaptation())
    for label, adapt_fn in _adapters(config, model, loss_fn,
                                     out['state'].params).items():
      inits[f'{prefix}+{label}'] = (state, adapt_fn)
  replay = None
  if config.personalize.get('replay_per_word', 0):
    # Clips of the global model's own training speakers: what a device can
    # ship next to the model, never the user's or a meta-training speaker's.
    replay = enrollment.replay_buffer(
        pre_ds.x, pre_ds.y, keywords, config.personalize.replay_per_word,
        seed=config.seed)
  timings = {}
  if meta_cfg.names:
    train_table = enrollment.enrollment_table(
        meta_ds.x, meta_ds.y, meta_ds.client_id, keywords,
        pool_size=meta_cfg.train_k)
  for index, name in enumerate(meta_cfg.names):
    learner = meta_learners.build_meta_learner(
        name, model, num_classes=train_ds.num_classes,
        inner_lr=meta_cfg.inner_lr, inner_steps=meta_cfg.inner_steps,
        eval_inner_steps=meta_cfg.eval_inner_steps,
        outer_lr=meta_cfg.outer_lr,
        reptile_step_size=meta_cfg.reptile_step_size, loss_fn=loss_fn)
    # Meta-training supports get the same replay as enrollment, so that the
    # inner loop a learner is meta-trained for is the one it runs at test
    # time.
    sample = lambda k: enrollment.with_replay(
        enrollment.sample_enrollment_tasks(
            train_table, k, num_tasks=meta_cfg.tasks_per_step,
            k_shot=meta_cfg.train_k), replay)
    state, timings[name] = meta_training.meta_train(
        learner, learner.init(params, glob['state'].model_state), sample,
        num_steps=meta_cfg.num_steps,
        key=jax.random.fold_in(key, 100 + index),
        log_every=meta_cfg.log_every,
        workdir=os.path.join(workdir, f'meta_{name}'), name=f'meta {name}',
        checkpoint_every=meta_cfg.get('checkpoint_every', 0))
    inits[name] = (state, personalize.learner_adapter(learner))

  if users is None:
    users = _load_users(config, train_ds)
  personal, user_info = _personalisation(config, model, loss_fn, inits, users,
                                         keywords, jax.random.fold_in(key, 7),
                                         replay)
  keyword_split = {}
  if config.keyword_split.names:
    keyword_split = meta_training.keyword_benchmark(
        config.keyword_split, train_ds, test_ds, model_name=config.model,
        model_kwargs={'norm': config.norm, **quant.model_kwargs(),
                      **config.keyword_split.model_kwargs.to_dict()},
        seed=config.seed,
        workdir=os.path.join(workdir, 'keyword_split'))

  results = {
      'config': config.to_dict(),
      'global_model': glob['metrics'],
      'global_models': {k: v['metrics'] for k, v in global_models.items()},
      'speakers': {'pretrain': len(pre_ds.clients()),
                   'meta_train': len(meta_ds.clients()) if meta_cfg.names
                                 else 0,
                   'test': len(test_ds.clients())},
      'meta_training': timings,
      'personalisation': personal,
      'users': user_info,
      'keyword_split': keyword_split,
      'goals': report.goals(personal, config),
      'seconds': time.time() - start}
  report.write(results, config, workdir)
  return results
