"""`run(config, workdir)`: continual learning after enrollment, end to end.

1. Check the whole config, every variant included (`validate_config`),
   before anything loads or compiles.
2. Pre-train (or reuse) the global model (`central.pretrain` through
   `continual.pretrained`).
3. Synthesise new users (`ondevice.user_corpus`), split each user's keyword
   clips into enrollment / test / stream utterances and build their
   unlabelled streams (`continual.streams`).
4. Enroll every user (a short fine-tune on K labelled utterances per
   keyword) and calibrate their keyword verifier for the target FAR.
5. For every variant of the config (regulariser on/off, verification on/off,
   TTA baselines, ...), run every user's stream in chunks and log the user's
   accuracy and the global held-out speakers' accuracy over time.
6. Write results.json, results.md and curves.png to `workdir`
   (`continual.report`).

Techniques are composed by wrapping: the task loss is wrapped by the
regulariser and then by augmentation; the quant mode reaches the model
through its hooks; the trainable preset decides which leaves are
differentiated at all. Parts named in the config are resolved here, once:
the quant mode (`quantized_training.get_quant`), the trainable preset
(`sparse_updates.resolve`), the method, regulariser and drift (their
sub-configs, see `continual.validation.SCHEMAS`).
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
from continual import validation
from ondevice import options
from ondevice import train
from ondevice import user_corpus
import quantized_training
import sparse_updates

# One padded batch shape for every evaluation and embedding: one compilation.
_EVAL_BATCH = learner.INFERENCE_BATCH

validate_config = validation.validate_config
variant_config = validation.variant_config


def method_params(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The sub-config of the variant's learner method."""
  return cfg.learner.method[cfg.learner.method.name]


def _settings(cfg: ml_collections.ConfigDict) -> learner.Settings:
  method, params = cfg.learner.method.name, method_params(cfg)
  distill = (cfg.regularizer.distillation.batch_size
             if cfg.regularizer.name == 'distillation' else 0)
  return learner.Settings(
      method=method, steps_per_chunk=cfg.learner.steps_per_chunk,
      batch_size=cfg.learner.batch_size,
      distill_batch_size=distill if method == 'pseudo_label' else 0,
      replay_capacity=params.get('replay_capacity', 0),
      confidence=cfg.pseudo.confidence, verify=cfg.pseudo.verify,
      bn_window=params.get('bn_window', 1),
      teacher_bn=params.get('teacher_bn', False))


def _drift(config: ml_collections.ConfigDict) -> streams.DriftConfig:
  drift = config.stream.drift
  return streams.DriftConfig(drift.name, **drift[drift.name])


def _trainable(config, params):
  """(paths, channel masks or None) of config.trainable's preset."""
  _, kwargs = options.selected(config.trainable,
                               sparse_updates.presets.PRESET_BUILDERS,
                               'config.trainable')
  scheme = sparse_updates.resolve(config.trainable.name, params,
                                  key=jax.random.key(config.seed), **kwargs)
  return scheme.paths, scheme.masks


def _optimizer(learning_rate: float, masks) -> optax.GradientTransformation:
  opt = optax.adam(learning_rate)
  if masks:
    opt = sparse_updates.masked_optimizer(opt, masks)
  return opt


def _committed(state: train.TrainState) -> train.TrainState:
  """`state` placed on the device its steps return it on.

  A fresh state's step counter is an uncommitted array while a jitted step
  returns committed ones, and jit compiles once per placement: committing
  up front keeps every step function at one compilation.
  """
  return jax.device_put(state, jax.devices()[0])


def _initial_state(cfg, params, model_state, paths, masks
                   ) -> train.TrainState:
  """A fresh optimiser around `params` for the variant's method."""
  method = cfg.learner.method
  if method.name == 'tent':
    optimizer, paths = (optax.adam(method.tent.learning_rate),
                        tta.norm_paths(params))
  elif method.name == 'bn_adapt':  # Never steps: no optimiser state needed.
    optimizer = optax.identity()
  else:
    optimizer = _optimizer(method.pseudo_label.learning_rate, masks)
  return _committed(train.state_from_params(params, model_state, optimizer,
                                            paths))


def _shared_functions(config, model, masks, paths) -> learner.Functions:
  """Jitted functions every variant shares: inference and enrollment."""
  logits = objectives.logits_fn(model)
  enroll_loss = objectives.frozen_stats_loss(model)
  if config.enroll.augment:
    enroll_loss = objectives.with_augmentation(enroll_loss)
  return learner.Functions(
      classify=jax.jit(lambda p, s, x: logits(p, s, x, None)),
      embed=jax.jit(objectives.embedding_fn(model)),
      train_step=None,
      enroll_step=jax.jit(train.make_train_step(
          enroll_loss, _optimizer(config.enroll.learning_rate, masks), paths)),
      tent_step=None, adapt_bn=None)


def _regularized_loss(cfg, model, pre, fisher) -> train.LossFn:
  """The task loss wrapped by the variant's regulariser."""
  reg = cfg.regularizer
  params = reg[reg.name]
  return regularizers.build(
      reg.name, objectives.frozen_stats_loss(model),
      reference=pre.params, reference_state=pre.model_state,
      logits_fn=objectives.logits_fn(model), fisher=fisher,
      strength=params.get('strength', 1.0),
      temperature=params.get('temperature', 2.0),
      min_confidence=params.get('min_teacher_confidence', 0.0))


@dataclasses.dataclass
class _Setup:
  """What every variant shares: the pre-trained model, users, evaluation."""
  pre: Any
  model: Any
  paths: tuple[str, ...]
  masks: Any
  fisher: Any
  score: Callable[..., float]
  global_x: np.ndarray
  global_y: np.ndarray
  users: list[dict[str, Any]]
  fns: learner.Functions
  adapt_bn: dict[float, Callable] = dataclasses.field(default_factory=dict)


def _adapt_bn(setup: _Setup, prior: float) -> Callable:
  """The jitted batch-norm adaptation with prior N, one per N per run."""
  if prior not in setup.adapt_bn:
    model = setup.model
    setup.adapt_bn[prior] = jax.jit(lambda p, s, x, m: tta.adapt_batch_norm(
        model, p, s, x, prior, m))
  return setup.adapt_bn[prior]


def _variant_functions(cfg, setup: _Setup) -> learner.Functions:
  """The setup's shared functions plus the step of the variant's method."""
  name, params = cfg.learner.method.name, method_params(cfg)
  model, pre, shared = setup.model, setup.pre, setup.fns
  if name == 'tent':
    return shared._replace(tent_step=jax.jit(tta.make_tent_step(
        model, optax.adam(params.learning_rate), pre.params)))
  adapt_bn = _adapt_bn(setup, params.bn_prior)
  if name == 'bn_adapt':
    return shared._replace(adapt_bn=adapt_bn)
  loss = _regularized_loss(cfg, model, pre, setup.fisher)
  if params.augment:
    loss = objectives.with_augmentation(loss)
  return shared._replace(
      train_step=jax.jit(train.make_train_step(
          loss, _optimizer(params.learning_rate, setup.masks), setup.paths)),
      adapt_bn=adapt_bn if params.teacher_bn else None)


def _load_users(config, pre) -> user_corpus.NewUsers:
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


def _users(config, pre) -> list[dict[str, Any]]:
  """Each user's split and unlabelled stream, features normalised."""
  drift = _drift(config)
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


def _setup(config, fisher_cfg: ml_collections.ConfigDict | None) -> _Setup:
  """Pre-trained model, jitted shared functions and the users' streams.

  Args:
    config: the base config.
    fisher_cfg: a variant that needs EWC's Fisher information, or None.
  """
  quant = quantized_training.get_quant(config.quant)
  pre = pretrained_lib.load_pretrained(config)
  model = pretrained_lib.build_model(config, pre.train_ds.num_classes,
                                     quant.model_kwargs())
  paths, masks = _trainable(config, pre.params)
  fisher = (pretrained_lib.fisher(fisher_cfg, pre, model)
            if fisher_cfg is not None else None)
  eval_fn = jax.jit(train.make_eval_step(model))
  score = lambda p, s, x, y: train.evaluate(
      eval_fn, p, s, x, y, _EVAL_BATCH)['accuracy']
  pick = streams.host_rng(jax.random.key(config.seed)).choice(
      len(pre.test_ds), min(config.global_eval_examples, len(pre.test_ds)),
      replace=False)
  return _Setup(pre, model, paths, masks, fisher, score, pre.test_ds.x[pick],
                pre.test_ds.y[pick], _users(config, pre),
                _shared_functions(config, model, masks, paths))


def _enroll_user(config, setup: _Setup, user: dict[str, Any], n: int) -> None:
  """Enrolls one user and builds their verifier (added to `user`)."""
  pre, fns, score = setup.pre, setup.fns, setup.score
  split = user['split']
  state = _committed(train.state_from_params(
      pre.params, pre.model_state,
      _optimizer(config.enroll.learning_rate, setup.masks), setup.paths))
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


def _user_record(user, curve, quality, final_global) -> dict[str, Any]:
  """What the report keeps of one user's stream."""
  verifier = user['verifier']
  return dict(
      index=user['index'], accent=user['accent'],
      pretrained_user_accuracy=user['pretrained_user_accuracy'],
      enrolled_user_accuracy=user['enrolled_user_accuracy'],
      enrolled_clean_user_accuracy=curve[0]['user_accuracy'],
      final_user_accuracy=curve[-1]['user_accuracy'],
      enrolled_global_accuracy=user['enrolled_global_accuracy'],
      final_global_accuracy=final_global, threshold=verifier.threshold,
      enrollment_far=verifier.enrollment_far,
      enrollment_frr=verifier.enrollment_frr, quality=quality, curve=curve)


def _run_user(cfg, setup: _Setup, fns: learner.Functions, user, n: int,
              seed: int) -> dict[str, Any]:
  """One user's stream under one variant; the user's record."""
  pre, score, split = setup.pre, setup.score, user['split']

  def evaluate(params, model_state, level):
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
  return _user_record(user, curve, quality, final_global)


def _run_variant(name: str, cfg, setup: _Setup, seed: int, t0: float
                 ) -> list[dict[str, Any]]:
  """Every user's stream under one variant; per-user records."""
  fns = _variant_functions(cfg, setup)
  per_user = []
  for n, user in enumerate(setup.users):
    try:
      record = _run_user(cfg, setup, fns, user, n, seed)
    except FloatingPointError as e:
      raise FloatingPointError(f'Variant {name!r}, user {user["index"]}: '
                               f'{e}') from e
    per_user.append(record)
    logging.info('%s user %d (%s): user acc %.3f -> %.3f, global %.3f, '
                 'precision %.3f recall %.3f (%.0f s)', name, user['index'],
                 user['accent'], record['enrolled_clean_user_accuracy'],
                 record['final_user_accuracy'],
                 record['final_global_accuracy'],
                 record['quality']['precision'],
                 record['quality']['recall'], time.time() - t0)
  return per_user


def _variants(config) -> dict[str, ml_collections.ConfigDict]:
  """The merged config of every variant, the main one first."""
  main = config.main_variant
  names = [main] + [n for n in config.variants if n != main]
  return {name: variant_config(config, name) for name in names}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every variant on every user; returns (and writes) the results."""
  validate_config(config)
  t0 = time.time()
  cfgs = _variants(config)
  ewc = [cfg for cfg in cfgs.values() if cfg.regularizer.name == 'ewc']
  setup = _setup(config, ewc[0] if ewc else None)
  logging.info('Users %s ready after %.0f s.',
               [u['index'] for u in setup.users], time.time() - t0)
  for n, user in enumerate(setup.users):
    _enroll_user(config, setup, user, n)
  pre = setup.pre
  pre_global = setup.score(pre.params, pre.model_state, pre.test_ds.x,
                           pre.test_ds.y)
  results = {'config': config.to_dict(), 'pretrained': pre.metrics,
             'pretrained_global_accuracy': pre_global, 'variants': {}}
  for name, cfg in cfgs.items():
    per_user = _run_variant(name, cfg, setup, config.seed, t0)
    results['variants'][name] = report.summarize_variant(per_user, pre_global)
  results['seconds'] = time.time() - t0
  report.write(results, workdir)
  return results
