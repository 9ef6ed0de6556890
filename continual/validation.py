"""Checks of a continual-learning config, run before any data loads.

`validate_config(config)` checks every key of configs/continual_kws.py-style
configs and then every variant merged into the base (`variant_config`), so a
bad value fails in well under a second with its dotted key named, instead of
after pre-training or in the middle of a stream. Parts chosen by name (the
learner's method, the regulariser, the drift, the trainable preset) are a
`name` plus one sub-config per choice; `SCHEMAS` lists the keys each choice
takes.
"""
from __future__ import annotations

import math

import ml_collections

from central import supervised
from continual import streams
from ondevice import options
from ondevice import user_corpus
from ondevice.data import speech_keywords

# Dotted key of a named part -> {choice: the keys of its sub-config}.
SCHEMAS = {
    'learner.method': {
        'pseudo_label': ('learning_rate', 'replay_capacity', 'augment',
                         'teacher_bn', 'bn_window', 'bn_prior'),
        'bn_adapt': ('bn_window', 'bn_prior'),
        'tent': ('learning_rate',),
    },
    'regularizer': {
        'none': (),
        'distillation': ('strength', 'temperature', 'min_teacher_confidence',
                         'batch_size'),
        'l2_sp': ('strength',),
        'ewc': ('strength', 'fisher_examples'),
    },
    'stream.drift': {
        'none': (),
        'noise': ('start', 'snr_db'),
        'speed': ('start', 'rate'),
    },
}
# Presets that need a model built for them; continual models are plain.
_UNSUPPORTED_PRESETS = ('lite_residual',)
_TOP_KEYS = ('pretrain', 'pretrain_dir', 'quant', 'trainable', 'users',
             'stream', 'enroll', 'pseudo', 'learner', 'regularizer',
             'variants', 'main_variant', 'global_eval_examples', 'seed')


def variant_config(config: ml_collections.ConfigDict, name: str
                   ) -> ml_collections.ConfigDict:
  """The base config with config.variants[name]'s fields replaced."""
  if name not in config.variants:
    raise ValueError(f'Unknown variant {name!r}; config.variants has '
                     f'{sorted(config.variants)}.')
  out = ml_collections.ConfigDict(config.to_dict())
  del out['variants']

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


def integers(config, *keys: str, minimum: int = 0) -> None:
  """Each dotted key holds an int >= minimum."""
  for key in keys:
    value = options.get(config, key)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f'config.{key} must be an integer; got {value!r}.')
    if value < minimum:
      raise ValueError(f'config.{key} must be >= {minimum}; got {value}.')


def check_named(config, key: str) -> None:
  """config.<key>.name is a choice of SCHEMAS[key], each with its keys."""
  schema = SCHEMAS[key]
  options.require(config, [f'{key}.name'] + [f'{key}.{c}' for c in schema])
  options.one_of(config, f'{key}.name', list(schema))
  node = options.get(config, key)
  unknown = sorted(set(node) - set(schema) - {'name'})
  if unknown:
    raise ValueError(f'config.{key} has unknown entries {unknown}; the '
                     f'choices are {list(schema)}.')
  for choice, keys in schema.items():
    have = set(node[choice])
    if have != set(keys):
      raise ValueError(
          f'config.{key}.{choice} must hold exactly {sorted(keys)}; it lacks '
          f'{sorted(set(keys) - have)} and has unknown '
          f'{sorted(have - set(keys))}.')


def _check_learner(config) -> None:
  check_named(config, 'learner.method')
  integers(config, 'learner.steps_per_chunk')
  integers(config, 'learner.batch_size', minimum=1)
  method = 'learner.method.'
  options.positive(config, method + 'pseudo_label.learning_rate',
                   method + 'tent.learning_rate')
  integers(config, method + 'pseudo_label.replay_capacity')
  options.booleans(config, method + 'pseudo_label.augment',
                   method + 'pseudo_label.teacher_bn')
  for choice in ('pseudo_label', 'bn_adapt'):
    integers(config, f'{method}{choice}.bn_window', minimum=1)
    options.non_negative(config, f'{method}{choice}.bn_prior')


def _check_regularizer(config) -> None:
  check_named(config, 'regularizer')
  for choice in ('distillation', 'l2_sp', 'ewc'):
    options.non_negative(config, f'regularizer.{choice}.strength')
  options.positive(config, 'regularizer.distillation.temperature')
  options.in_range(config, 'regularizer.distillation.min_teacher_confidence',
                   0.0, 1.0)
  integers(config, 'regularizer.distillation.batch_size')
  integers(config, 'regularizer.ewc.fisher_examples', minimum=1)


def _check_quant_and_trainable(config) -> None:
  import quantized_training  # pylint: disable=g-import-not-at-top
  import sparse_updates  # pylint: disable=g-import-not-at-top
  options.one_of(config, 'quant', quantized_training.QUANT_NAMES)
  table = sparse_updates.presets.PRESET_BUILDERS
  options.selected(config.trainable, table, 'config.trainable')
  if config.trainable.name in _UNSUPPORTED_PRESETS:
    raise ValueError(
        f'config.trainable.name={config.trainable.name!r} needs a model built '
        'for it, and continual learning fine-tunes the plain pre-trained '
        f'model; choose one of '
        f'{sorted(set(table) - set(_UNSUPPORTED_PRESETS))}.')


def _check_users(config) -> None:
  users = 'users.'
  integers(config, *(users + k for k in (
      'num_typical', 'num_outlier', 'other_utterances', 'num_noise')))
  integers(config, users + 'num_enroll', users + 'num_test', minimum=1)
  if config.users.num_typical + config.users.num_outlier == 0:
    raise ValueError('config.users.num_typical + num_outlier must be >= 1; '
                     'got 0 users.')
  held = config.users.num_enroll + config.users.num_test
  integers(config, users + 'utterances_per_word', minimum=held + 1)
  speakers = config.pretrain.data.num_speakers
  integers(config, users + 'first_index', minimum=speakers)


def _check_enroll_and_pseudo(config) -> None:
  integers(config, 'enroll.num_steps')
  integers(config, 'enroll.batch_size', minimum=1)
  options.positive(config, 'enroll.learning_rate')
  options.booleans(config, 'enroll.augment', 'pseudo.verify')
  options.in_range(config, 'pseudo.confidence', 0.0, 1.0)
  options.in_range(config, 'pseudo.target_far', 0.0, 1.0,
                   low_inclusive=False, high_inclusive=False)


def _pool_sizes(config) -> dict[str, int]:
  """Clips each stream source can draw from, computed from the config."""
  data, users = config.pretrain.data, config.users
  words = len(data.get('words', None) or speech_keywords.WORDS)
  test = min(data.num_speakers - 1,
             max(1, round(data.test_fraction * data.num_speakers)))
  stream_utts = (users.utterances_per_word - users.num_enroll -
                 users.num_test)
  return {'user_keyword': words * stream_utts,
          'user_other_word': len(user_corpus.OTHER_WORDS) *
                             users.other_utterances,
          'other_speaker': (data.num_speakers - test) * words *
                           data.utterances_per_word,
          'noise': users.num_noise}


def _check_stream(config) -> None:
  check_named(config, 'stream.drift')
  integers(config, 'stream.length', 'stream.chunk_size', minimum=1)
  for choice in ('noise', 'speed'):
    options.in_range(config, f'stream.drift.{choice}.start', 0.0, 1.0,
                     high_inclusive=False)
  options.positive(config, 'stream.drift.speed.rate')
  options.in_range(config, 'stream.drift.noise.snr_db', -math.inf, math.inf)
  try:
    counts = streams.source_counts(config.stream.length,
                                   tuple(config.stream.mix))
  except ValueError as e:
    raise ValueError(f'config.stream.mix={tuple(config.stream.mix)}: {e}'
                     ) from None
  for (source, size), count in zip(_pool_sizes(config).items(), counts):
    if count > size:
      raise ValueError(
          f'config.stream.length={config.stream.length} with config.stream.'
          f'mix gives {count} clips to {source!r}, whose pool holds {size} '
          'clips (see config.users); lower the length or raise the pool.')


def _check_variant(config) -> None:
  """Every key of one merged (variant-free) config."""
  options.require(config, [k for k in _TOP_KEYS if k != 'variants'])
  _check_quant_and_trainable(config)
  _check_users(config)
  _check_stream(config)
  _check_enroll_and_pseudo(config)
  _check_learner(config)
  _check_regularizer(config)
  integers(config, 'global_eval_examples', minimum=1)
  integers(config, 'seed')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config and every variant; raises ValueError naming keys.

  Needs no data and compiles nothing.
  """
  options.require(config, _TOP_KEYS)
  try:
    supervised.validate_config(config.pretrain)
  except ValueError as e:  # Its keys are relative to config.pretrain.
    raise ValueError(str(e).replace('config.', 'config.pretrain.')) from None
  user_corpus.corpus_config(config.pretrain.data)  # speech_keywords only.
  if not config.variants:
    raise ValueError('config.variants is empty; give at least one variant '
                     "(e.g. {'base': {}}).")
  if config.main_variant not in config.variants:
    raise ValueError(f'config.main_variant={config.main_variant!r} is not '
                     f'one of config.variants {sorted(config.variants)}.')
  base = ml_collections.ConfigDict(config.to_dict())
  del base['variants']
  _check_variant(base)
  fisher = set()
  for name in config.variants:
    merged = variant_config(config, name)
    try:
      _check_variant(merged)
    except ValueError as e:
      raise ValueError(f'config.variants.{name} (merged into the base '
                       f'config): {e}') from None
    if merged.regularizer.name == 'ewc':
      fisher.add(merged.regularizer.ewc.fisher_examples)
  if len(fisher) > 1:  # One Fisher estimate serves every EWC variant.
    raise ValueError('config.regularizer.ewc.fisher_examples differs between '
                     f'the EWC variants ({sorted(fisher)}); set it once.')
