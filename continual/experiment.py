"""`run(config, workdir)`: continual learning after enrollment, end to end.

1. Pre-train (or restore) the global DS-CNN (`continual.pretrained`).
2. Synthesise new users (`ondevice.user_corpus`), split each
   user's keyword clips into enrollment / test / stream utterances and build
   their unlabelled streams (`continual.streams`).
3. Enroll every user (a short fine-tune on K labelled utterances per
   keyword) and calibrate their keyword verifier for the target FAR.
4. For every variant of the config (regulariser on/off, verification on/off,
   TTA baselines, ...), run every user's stream in chunks and log the user's
   accuracy and the global held-out speakers' accuracy over time.
5. Write results.json, results.md and curves.png to `workdir`
   (`continual.report`).

Techniques are composed by wrapping: the task loss is wrapped by the
regulariser and then by augmentation; the quant mode reaches the model
through its hooks; the trainable preset decides which leaves are
differentiated at all.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from continual import learner
from continual import objectives
from continual import pretrained as pretrained_lib
from continual import pseudo_label
from continual import regularizers
from continual import report
from continual import streams
from continual import tta
from ondevice import train
from ondevice import user_corpus

_EVAL_BATCH = 128


def variant_config(config: ml_collections.ConfigDict, name: str
                   ) -> ml_collections.ConfigDict:
  """The base config with config.variants[name]'s fields replaced."""
  out = ml_collections.ConfigDict(config.to_dict())
  del out['variants']
  if name not in config.variants:
    raise ValueError(f'Unknown variant {name!r}; config.variants has '
                     f'{sorted(config.variants)}.')

  def merge(target, overrides, prefix):
    for key, value in overrides.items():
      if key not in target:
        raise ValueError(f'config.variants.{name} sets {prefix}{key}, which '
                         'the base config does not have; fix the name.')
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        merge(target[key], value, f'{prefix}{key}.')
      else:
        target[key] = value
  merge(out, config.variants[name], '')
  return out


def _settings(cfg: ml_collections.ConfigDict) -> learner.Settings:
  distill = (cfg.learner.distill_batch_size
             if cfg.regularizer.name == 'distillation' else 0)
  return learner.Settings(
      method=cfg.learner.method, steps_per_chunk=cfg.learner.steps_per_chunk,
      batch_size=cfg.learner.batch_size, distill_batch_size=distill,
      replay_capacity=cfg.learner.replay_capacity,
      confidence=cfg.pseudo.confidence, verify=cfg.pseudo.verify,
      bn_window=cfg.learner.bn_window, teacher_bn=cfg.learner.teacher_bn)


def _quant_kwargs(name: str) -> dict[str, Any]:
  if name == 'none':
    return {}
  import quantized_training  # pylint: disable=g-import-not-at-top
  return quantized_training.get_quant(name).model_kwargs()


def _trainable(name: str, params):
  """(paths, channel masks or None) of the sparse_updates preset `name`."""
  if name == 'full':
    return train.resolve_trainable(params, None), None
  import sparse_updates.channel_masks as channel_masks  # pylint: disable=g-import-not-at-top
  import sparse_updates.presets as presets  # pylint: disable=g-import-not-at-top
  import sparse_updates.rules as rules_lib  # pylint: disable=g-import-not-at-top
  rules = presets.get_rules(name, params)
  masks = (channel_masks.update_masks(params, rules)
           if rules_lib.channel_fractions(params, rules) else None)
  return rules_lib.trainable_paths(params, rules), masks


def _optimizer(learning_rate: float, masks) -> optax.GradientTransformation:
  opt = optax.adam(learning_rate)
  if masks:
    import sparse_updates.channel_masks as channel_masks  # pylint: disable=g-import-not-at-top
    opt = channel_masks.masked_optimizer(opt, masks)
  return opt


def _initial_state(cfg, params, model_state, paths, masks
                   ) -> train.TrainState:
  """A fresh optimiser around `params` for the variant's method."""
  if cfg.learner.method == 'tent':
    return train.state_from_params(
        params, model_state, optax.adam(cfg.learner.tent_learning_rate),
        tta.norm_paths(params))
  return train.state_from_params(
      params, model_state, _optimizer(cfg.learner.learning_rate, masks), paths)


def _shared_functions(cfg, model, masks, paths) -> learner.Functions:
  """Jitted functions every variant shares: inference and enrollment."""
  logits = objectives.logits_fn(model)
  enroll_loss = objectives.frozen_stats_loss(model)
  if cfg.enroll.augment:
    enroll_loss = objectives.with_augmentation(enroll_loss)
  return learner.Functions(
      classify=jax.jit(lambda p, s, x: logits(p, s, x, None)),
      embed=jax.jit(objectives.embedding_fn(model)),
      train_step=None,
      enroll_step=jax.jit(train.make_train_step(
          enroll_loss, _optimizer(cfg.enroll.learning_rate, masks), paths)),
      tent_step=None, adapt_bn=None)


def _variant_functions(cfg, model, pre, fisher, paths, masks,
                       shared: learner.Functions) -> learner.Functions:
  """`shared` plus the step of the variant's method."""
  if cfg.learner.method == 'tent':
    return shared._replace(tent_step=jax.jit(tta.make_tent_step(
        model, optax.adam(cfg.learner.tent_learning_rate), pre.params)))
  adapt_bn = jax.jit(lambda p, s, x, m: tta.adapt_batch_norm(
      model, p, s, x, cfg.learner.bn_prior, m))
  if cfg.learner.method == 'bn_adapt':
    return shared._replace(adapt_bn=adapt_bn)
  loss = regularizers.build(
      cfg.regularizer.name, objectives.frozen_stats_loss(model),
      reference=pre.params, reference_state=pre.model_state,
      logits_fn=objectives.logits_fn(model), fisher=fisher,
      strength=cfg.regularizer.strength,
      temperature=cfg.regularizer.temperature,
      min_confidence=cfg.regularizer.min_teacher_confidence)
  if cfg.learner.augment:
    loss = objectives.with_augmentation(loss)
  return shared._replace(
      train_step=jax.jit(train.make_train_step(
          loss, _optimizer(cfg.learner.learning_rate, masks), paths)),
      adapt_bn=adapt_bn if cfg.learner.teacher_bn else None)


def _load_users(config, pre: pretrained_lib.Pretrained
                ) -> user_corpus.NewUsers:
  """The config's new users, normalised like the pre-training data."""
  corpus = user_corpus.corpus_config(config.pretrain.data)
  cfg = config.users
  indices = user_corpus.pick_users(corpus, cfg.first_index, cfg.num_typical,
                                   cfg.num_outlier)
  clips = user_corpus.UserClips(cfg.utterances_per_word,
                                cfg.other_utterances, cfg.num_noise)
  users = user_corpus.load_users(
      corpus, indices, clips, config.pretrain.data.get('cache_dir', '') or None)
  return user_corpus.normalise_like(users, pre.train_ds)


def _users(config, pre: pretrained_lib.Pretrained) -> list[dict[str, Any]]:
  """Each user's split and unlabelled stream, features normalised."""
  drift = streams.DriftConfig(config.stream.drift, config.stream.drift_start,
                              config.stream.drift_snr_db,
                              config.stream.drift_rate)
  corpus = _load_users(config, pre)
  users = []
  for n, index in enumerate(corpus.indices):
    data = corpus.of_user(index)
    kw = data.keywords
    split = streams.split_user(kw.x, kw.y, kw.meta['utterance'],
                               config.users.num_enroll, config.users.num_test)
    no_kw = lambda ds: np.full(len(ds), streams.NO_KEYWORD, np.int32)
    pools = {'user_keyword': (split.stream_x, split.stream_y),
             'user_other_word': (data.other_words.x, no_kw(data.other_words)),
             'other_speaker': (pre.train_ds.x, pre.train_ds.y),
             'noise': (data.noise.x, no_kw(data.noise))}
    key = jax.random.fold_in(jax.random.key(config.seed), 1000 + n)
    stream = streams.make_stream(pools, config.stream.length, key,
                                 tuple(config.stream.mix), drift,
                                 pre.feature_stats)
    users.append(dict(index=index,
                      accent=corpus.speaker(index)['accent_group'],
                      split=split, stream=stream, drift=drift))
  return users


@dataclasses.dataclass
class _Setup:
  """What every variant shares: the pre-trained model, users, evaluation."""
  pre: pretrained_lib.Pretrained
  model: Any
  paths: tuple[str, ...]
  masks: Any
  fisher: Any
  score: Callable[..., float]
  global_x: np.ndarray
  global_y: np.ndarray
  users: list[dict[str, Any]]
  fns: learner.Functions


def _setup(config, needs_fisher: bool) -> _Setup:
  """Pre-trained model, jitted shared functions and the users' streams."""
  pre = pretrained_lib.load_pretrained(config)
  model = pretrained_lib.build_model(config, pre.train_ds.num_classes,
                                     _quant_kwargs(config.quant))
  paths, masks = _trainable(config.trainable, pre.params)
  fisher = pretrained_lib.fisher(config, pre, model) if needs_fisher else None
  eval_fn = jax.jit(train.make_eval_step(model))
  score = lambda p, s, x, y: train.evaluate(
      eval_fn, p, s, x, y, min(_EVAL_BATCH, len(x)))['accuracy']
  pick = streams.host_rng(jax.random.key(config.seed)).choice(
      len(pre.test_ds), min(config.global_eval_examples, len(pre.test_ds)),
      replace=False)
  return _Setup(pre, model, paths, masks, fisher, score, pre.test_ds.x[pick],
                pre.test_ds.y[pick], _users(config, pre),
                _shared_functions(config, model, masks, paths))


def _enroll(config, setup: _Setup) -> None:
  """Enrolls every user and builds their verifier (added to the user)."""
  pre, fns, score = setup.pre, setup.fns, setup.score
  for n, user in enumerate(setup.users):
    split = user['split']
    state = train.state_from_params(
        pre.params, pre.model_state,
        _optimizer(config.enroll.learning_rate, setup.masks), setup.paths)
    end_test = _user_test(user, pre, float(user['stream'].drift[-1]))
    user['pretrained_user_accuracy'] = score(pre.params, pre.model_state,
                                             end_test, split.test_y)
    enrolled = learner.enroll(
        fns.enroll_step, state, split.enroll_x, split.enroll_y,
        config.enroll.num_steps, config.enroll.batch_size,
        jax.random.fold_in(jax.random.key(config.seed), n))
    user['enrolled_params'] = enrolled.params
    user['verifier'] = learner.calibrate_verifier(
        fns.embed, enrolled.params, pre.model_state, split.enroll_x,
        split.enroll_y, pre.train_ds.num_classes, config.pseudo.target_far,
        _EVAL_BATCH)
    emb = learner.batched(lambda b: fns.embed(
        enrolled.params, pre.model_state, b), user['stream'].x, _EVAL_BATCH)
    user['stream_scores'] = np.asarray(pseudo_label.template_scores(
        user['verifier'].templates, emb))
    user['enrolled_global_accuracy'] = score(
        enrolled.params, pre.model_state, pre.test_ds.x, pre.test_ds.y)
    # The baseline a user would have without continual learning: the
    # enrolled model in the conditions at the end of the stream.
    user['enrolled_user_accuracy'] = score(enrolled.params, pre.model_state,
                                           end_test, split.test_y)


def _user_test(user, pre, level: float) -> np.ndarray:
  """The user's test clips under the stream's drift at `level`."""
  return streams.apply_drift(user['split'].test_x, level, user['drift'],
                             *pre.feature_stats)


def _run_variant(name: str, cfg, setup: _Setup, seed: int, t0: float
                 ) -> list[dict[str, Any]]:
  """Every user's stream under one variant; per-user records."""
  pre, score = setup.pre, setup.score
  fns = _variant_functions(cfg, setup.model, pre, setup.fisher, setup.paths,
                           setup.masks, setup.fns)
  per_user = []
  for n, user in enumerate(setup.users):
    split = user['split']

    def evaluate(params, model_state, level, split=split, user=user):
      return {'user_accuracy': score(params, model_state,
                                     _user_test(user, pre, level),
                                     split.test_y),
              'global_accuracy': score(params, model_state, setup.global_x,
                                       setup.global_y)}
    state = _initial_state(cfg, user['enrolled_params'], pre.model_state,
                           setup.paths, setup.masks)
    curve, quality, final = learner.run_stream(
        fns, _settings(cfg), state, user['stream'], cfg.stream.chunk_size,
        user['verifier'], user['stream_scores'], split.enroll_x,
        split.enroll_y, evaluate,
        jax.random.fold_in(jax.random.key(seed), 10**4 + n))
    final_global = score(final.params, final.model_state, pre.test_ds.x,
                         pre.test_ds.y)
    verifier = user['verifier']
    per_user.append(dict(
        index=user['index'], accent=user['accent'],
        pretrained_user_accuracy=user['pretrained_user_accuracy'],
        enrolled_user_accuracy=user['enrolled_user_accuracy'],
        enrolled_clean_user_accuracy=curve[0]['user_accuracy'],
        final_user_accuracy=curve[-1]['user_accuracy'],
        enrolled_global_accuracy=user['enrolled_global_accuracy'],
        final_global_accuracy=final_global, threshold=verifier.threshold,
        enrollment_far=verifier.enrollment_far,
        enrollment_frr=verifier.enrollment_frr, quality=quality,
        curve=curve))
    logging.info('%s user %d (%s): user acc %.3f -> %.3f, global %.3f, '
                 'precision %.3f recall %.3f (%.0f s)', name, user['index'],
                 user['accent'], curve[0]['user_accuracy'],
                 curve[-1]['user_accuracy'], final_global,
                 quality['precision'], quality['recall'], time.time() - t0)
  return per_user


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every variant on every user; returns (and writes) the results."""
  t0 = time.time()
  main = config.get('main_variant', '')
  if main not in config.variants:
    raise ValueError(f'config.main_variant={main!r} is not one of '
                     f'config.variants {sorted(config.variants)}.')
  names = [main] + [n for n in config.variants if n != main]
  cfgs = {name: variant_config(config, name) for name in names}
  for cfg in cfgs.values():
    _settings(cfg)  # Raises on a bad learner field before any work.
  setup = _setup(config, any(cfg.regularizer.name == 'ewc'
                             for cfg in cfgs.values()))
  logging.info('Users %s ready after %.0f s.',
               [u['index'] for u in setup.users], time.time() - t0)
  _enroll(config, setup)
  pre = setup.pre
  pre_global = setup.score(pre.params, pre.model_state, pre.test_ds.x,
                           pre.test_ds.y)
  results = {'config': config.to_dict(), 'pretrained': pre.metrics,
             'pretrained_global_accuracy': pre_global, 'variants': {}}
  for name in names:
    per_user = _run_variant(name, cfgs[name], setup, config.seed, t0)
    results['variants'][name] = report.summarize_variant(per_user, pre_global)
  results['seconds'] = time.time() - t0
  report.write(results, workdir)
  return results
