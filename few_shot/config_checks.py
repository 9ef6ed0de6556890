"""Checks of a few-shot config (configs/few_shot_kws.py) that need no data.

`validate(config)` runs every check in the order of the config's blocks; each
raises a ValueError that names the dotted key, the bad value and the valid
choices or range. `few_shot.experiment.run` calls it before any data loads
or anything compiles.
"""
from __future__ import annotations

import inspect

import ml_collections

from few_shot import meta_learners
from ondevice import models
from ondevice import optim
from ondevice import options
from ondevice.data import population
from ondevice.data import speech_keywords
import quantized_training
import sparse_updates

BLOCKS = ('data', 'model', 'model_kwargs', 'norm', 'quant', 'keywords', 'far',
          'seed', 'pretrain', 'users', 'personalize', 'meta', 'keyword_split',
          'report')
# Norms the meta-learners accept (see few_shot/learner.py): batch norm over a
# K-shot support set is meaningless.
META_NORMS = ('group', 'layer', 'none')
# lite_residual needs a LiteResidualModel, which this experiment never
# builds; the other presets apply to any model.
TRAINABLE = tuple(p for p in sparse_updates.PRESETS if p != 'lite_residual')


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check below; raises the first ValueError found."""
  missing = [f'config.{k}' for k in BLOCKS if k not in config]
  if missing:
    raise ValueError(f'The config lacks {missing}; start from '
                     'configs/few_shot_kws.py.')
  _data(config)
  _model(config)
  _top_level(config)
  _pretrain(config)
  _users(config)
  _personalize(config)
  _meta(config)
  _keyword_split(config)
  options.positive(config, 'report.outlier_gain_goal')
  _int_at_least(config, 'report.max_k', 1)


def _int_at_least(config, key: str, low: int) -> int:
  value = options.get(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f'config.{key} must be an int >= {low}; got {value!r}.')
  return value


def _ints_at_least(config, key: str, low: int) -> tuple[int, ...]:
  values = options.get(config, key)
  if isinstance(values, (str, int)) or not values:
    raise ValueError(f'config.{key} must be a non-empty tuple of ints >= '
                     f'{low}; got {values!r}.')
  if any(isinstance(v, bool) or not isinstance(v, int) or v < low
         for v in values):
    raise ValueError(f'config.{key}={tuple(values)} must hold ints >= '
                     f'{low}.')
  return tuple(values)


def _words(config, key: str) -> tuple[str, ...]:
  """A non-empty tuple of distinct corpus words at `key`."""
  words = options.get(config, key)
  if isinstance(words, str) or not words:
    raise ValueError(f'config.{key} must be a non-empty tuple of words; got '
                     f'{words!r}.')
  if len(set(words)) != len(words):
    raise ValueError(f'config.{key}={tuple(words)} repeats a word.')
  unknown = [w for w in words if w not in speech_keywords.WORDS]
  if config.data.name == 'speech_keywords' and unknown:
    raise ValueError(f'config.{key} has {unknown}, which the corpus does not '
                     f'speak; choose from {speech_keywords.WORDS}.')
  return tuple(words)


def _data(config) -> None:
  # New users are synthesised speakers of the same corpus.
  options.one_of(config, 'data.name', ('speech_keywords',))
  options.require(config, ['data.num_speakers', 'data.utterances_per_word',
                           'data.corpus_seed', 'data.test_fraction',
                           'data.split_seed'])
  _int_at_least(config, 'data.num_speakers', 2)
  _int_at_least(config, 'data.utterances_per_word', 2)
  _int_at_least(config, 'data.corpus_seed', 0)
  _int_at_least(config, 'data.split_seed', 0)
  options.in_range(config, 'data.test_fraction', 0.0, 1.0,
                   low_inclusive=False, high_inclusive=False)


def _model(config) -> None:
  options.one_of(config, 'model', models.MODEL_NAMES)
  options.one_of(config, 'norm', models.NORMS)
  learned = config.meta.get('names', ()) or config.keyword_split.get(
      'names', ())
  if learned and config.norm not in META_NORMS:
    raise ValueError(f'config.norm={config.norm!r} cannot be meta-learned '
                     '(batch statistics of a K-shot support set); choose one '
                     f'of {META_NORMS}, or empty config.meta.names and '
                     'config.keyword_split.names.')
  options.one_of(config, 'quant', quantized_training.QUANT_NAMES)
  _buildable(config, 'model_kwargs')
  if config.keyword_split.get('names', ()):
    _buildable(config, 'keyword_split.model_kwargs')


def _buildable(config, key: str) -> None:
  """config.model can be built with the keyword arguments at `key` (a
  flax module is only constructed here, nothing is initialised)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in options.get(config, key).items()}
  try:
    models.build_model(config.model, 2, norm=config.norm, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.{key}={kwargs} does not fit '
                     f'config.model={config.model!r}: {e}') from e


def _top_level(config) -> None:
  _words(config, 'keywords')
  options.in_range(config, 'far', 0.0, 1.0, high_inclusive=False)
  _int_at_least(config, 'seed', 0)


def _pretrain(config) -> None:
  """The global model's `central.supervised` fields under config.pretrain."""
  options.one_of(config, 'pretrain.optimizer', optim.OPTIMIZERS)
  options.one_of(config, 'pretrain.schedule', optim.SCHEDULES)
  options.positive(config, 'pretrain.learning_rate')
  for key in ('num_steps', 'batch_size', 'eval_batch_size', 'log_every',
              'eval_every', 'checkpoint_every'):
    _int_at_least(config, f'pretrain.{key}', 1)
  _int_at_least(config, 'pretrain.warmup_steps', 0)
  options.non_negative(config, 'pretrain.weight_decay', 'pretrain.grad_clip')
  options.in_range(config, 'pretrain.momentum', 0.0, 1.0,
                   high_inclusive=False)
  options.in_range(config, 'pretrain.label_smoothing', 0.0, 1.0,
                   high_inclusive=False)
  _checkpoints_at_logs(config, 'pretrain')


def _checkpoints_at_logs(config, block: str) -> None:
  """A resumed run logs the windows an uninterrupted one logs only if every
  checkpoint falls on a log step."""
  every, log_every = (options.get(config, f'{block}.{k}')
                      for k in ('checkpoint_every', 'log_every'))
  if every % log_every:
    raise ValueError(
        f'config.{block}.checkpoint_every={every} must be a multiple of '
        f'config.{block}.log_every={log_every}, so that a resumed run logs '
        'the same windows as an uninterrupted one.')


def _users(config) -> None:
  first = _int_at_least(config, 'users.first_index', 0)
  if first < config.data.num_speakers:
    raise ValueError(
        f'config.users.first_index={first} is a speaker of the pre-training '
        f'corpus (config.data.num_speakers={config.data.num_speakers}); new '
        f'users need first_index >= {config.data.num_speakers}.')
  typical = _int_at_least(config, 'users.num_typical', 0)
  outlier = _int_at_least(config, 'users.num_outlier', 0)
  if typical + outlier == 0:
    raise ValueError('config.users.num_typical and config.users.num_outlier '
                     'are both 0; ask for at least one user.')
  _int_at_least(config, 'users.utterances_per_word', 2)
  pop = population.population_from_config(
      config.data.get('population', None), 'config.data.population')
  if (outlier and pop is not None and not pop.held_out_families and
      not pop.held_out_conditions):
    raise ValueError(
        f'config.users.num_outlier={outlier}, but config.data.population='
        f'{pop.name!r} holds nothing out of pre-training, so it has no '
        "outlier (unseen) users: use 'mixed_unseen' or set num_outlier=0.")
  _worst_users(config)


def _worst_users(config) -> None:
  """The clip counts, calibration utterances and worst-group screening."""
  cfg = config.users
  calib = _int_at_least(config, 'users.calibration_utterances', 0) if (
      'calibration_utterances' in cfg) else 0
  other = (_int_at_least(config, 'users.other_utterances_per_word', 0)
           if 'other_utterances_per_word' in cfg else 0)
  if other and other <= calib:
    raise ValueError(
        f'config.users.other_utterances_per_word={other} must exceed '
        f'config.users.calibration_utterances={calib}: users need non-keyword '
        'clips that no calibration used, to measure false accepts on.')
  candidates = (_int_at_least(config, 'users.worst_candidates', 0)
                if 'worst_candidates' in cfg else 0)
  if not candidates:
    return
  options.in_range(config, 'users.worst_fraction', 0.0, 1.0,
                   low_inclusive=False, high_inclusive=False)
  if calib < 1:
    raise ValueError(
        f'config.users.worst_candidates={candidates} needs '
        'config.users.calibration_utterances >= 1: the worst users are '
        'selected on calibration clips that are never scored; got '
        f'{calib}.')
  if round(cfg.worst_fraction * candidates) < 1:
    raise ValueError(
        f'config.users.worst_fraction={cfg.worst_fraction} of '
        f'config.users.worst_candidates={candidates} selects no user; '
        'raise either.')


def _personalize(config) -> None:
  cfg = config.personalize
  ks = _ints_at_least(config, 'personalize.k_values', 1)
  calib = config.users.get('calibration_utterances', 0)
  bound = ('config.users.utterances_per_word - 1' if not calib else
           'config.users.utterances_per_word - config.users.'
           'calibration_utterances - 1')
  if max(ks) >= config.users.utterances_per_word - calib:
    raise ValueError(
        f'config.personalize.k_values={ks} must lie in [1, {bound}] = [1, '
        f'{config.users.utterances_per_word - calib - 1}]: every user keeps '
        'a clip per word to evaluate on, and calibration clips are never '
        'enrolled on.')
  _trainable(config)
  options.positive(config, 'personalize.learning_rate')
  _int_at_least(config, 'personalize.num_steps', 1)
  _int_at_least(config, 'personalize.eval_chunk', 1)
  replay = cfg.get('replay_per_word', 0)
  if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
    raise ValueError('config.personalize.replay_per_word must be an int >= 0 '
                     f'(0: enroll on keyword clips only); got {replay!r}.')


def _trainable(config) -> None:
  """Preset names, and every preset's arguments in trainable_kwargs."""
  trainable = options.get(config, 'personalize.trainable')
  if isinstance(trainable, str) or any(p not in TRAINABLE for p in trainable):
    raise ValueError(f'config.personalize.trainable={trainable!r} must be a '
                     f'tuple of presets from {TRAINABLE}.')
  kwargs = options.get(config, 'personalize.trainable_kwargs')
  for name in trainable:
    if name not in kwargs:
      raise ValueError(f'config.personalize.trainable_kwargs.{name} is '
                       'missing; every preset named needs its arguments.')
  for name, values in kwargs.items():
    if name not in TRAINABLE:
      raise ValueError(f'config.personalize.trainable_kwargs.{name}: '
                       f'{name!r} is no preset; choose from {TRAINABLE}.')
    builder = sparse_updates.presets.PRESET_BUILDERS[name]
    key = f'config.personalize.trainable_kwargs.{name}'
    options.check_kwargs(builder, dict(values), key)
    if 'params' not in inspect.signature(builder).parameters:
      try:  # Rules that need no model check their ranges now.
        builder(**{k: v for k, v in values.items() if v is not None})
      except (TypeError, ValueError) as e:
        raise ValueError(f'{key}: {e}') from e


def _meta(config) -> None:
  meta_learners.validate(config, 'meta')
  options.in_range(config, 'meta.speaker_fraction', 0.0, 1.0,
                   low_inclusive=False, high_inclusive=False)
  options.booleans(config, 'meta.all_speakers_baseline')
  if 'hold_out_speakers' in config.meta:  # Absent: False.
    options.booleans(config, 'meta.hold_out_speakers')
  train_k = _int_at_least(config, 'meta.train_k', 1)
  if train_k >= config.data.utterances_per_word:
    raise ValueError(
        f'config.meta.train_k={train_k} must be below '
        f'config.data.utterances_per_word={config.data.utterances_per_word}'
        ': a meta-training speaker keeps a query clip per word.')
  for key in ('num_steps', 'tasks_per_step', 'log_every'):
    _int_at_least(config, f'meta.{key}', 1)
  _int_at_least(config, 'meta.checkpoint_every', 0)
  _checkpoints_at_logs(config, 'meta')


def _keyword_split(config) -> None:
  meta_learners.validate(config, 'keyword_split')
  if not config.keyword_split.names:
    return
  train_words = _words(config, 'keyword_split.train_words')
  test_words = _words(config, 'keyword_split.test_words')
  shared = sorted(set(train_words) & set(test_words))
  if shared:
    raise ValueError(f'config.keyword_split.train_words and test_words share '
                     f'{shared}; the split tests on unseen keywords.')
  n_way = _int_at_least(config, 'keyword_split.n_way', 2)
  if n_way > min(len(train_words), len(test_words)):
    raise ValueError(
        f'config.keyword_split.n_way={n_way} exceeds the {len(train_words)} '
        f'train_words or the {len(test_words)} test_words.')
  _ints_at_least(config, 'keyword_split.k_shots', 1)
  for key in ('n_query', 'num_steps', 'tasks_per_step', 'eval_tasks',
              'log_every'):
    _int_at_least(config, f'keyword_split.{key}', 1)
