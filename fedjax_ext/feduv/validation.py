"""`validate_config`: every FedUV config value checked before data loads.

The splits' sizes follow from the config (`verification_data.check_config`),
so checks that involve the number of users or examples (the code's message
bits, the cohort size, the central batch size) run here too, and a bad value
fails in well under a second with its key named, not after minutes of
training.
"""
from __future__ import annotations

import copy

import ml_collections

from fedjax_ext import codes
from fedjax_ext import training
from fedjax_ext import verification
from fedjax_ext.feduv import variants as variants_lib
from ondevice import optim
from ondevice import options
from ondevice.data import verification as verification_data
import quantized_training

REQUIRED_KEYS = (
    'data', 'split', 'features', 'model', 'norm', 'model_kwargs', 'quant',
    'code.m', 'code.t', 'code.min_random_bits', 'embedding_dim',
    'logit_scale', 'feduv_margin', 'feduv_references', 'variants',
    'target_tpr', 'fars', 'eval_batch_size', 'seed', 'log_every',
    'central.optimizer', 'central.learning_rate', 'central.momentum',
    'central.num_steps', 'central.batch_size', 'central.log_every',
    'central.checkpoint_every', 'dp.noise_multiplier', 'dp.clip_norm',
    'dp.delta', 'dp.adaptive', 'dp.target_quantile') + training.REQUIRED_KEYS
# Keys read when present (`fedjax_ext.training` has defaults for them).
OPTIONAL_KEYS = ('client_momentum', 'dropout_rate', 'execution', 'aggregator',
                 'compression', 'weighted_sampling')
# Sub-configs whose every key FedUV knows -> the keys it reads there.
_KNOWN_SUBKEYS = {
    'code': ('m', 't', 'min_random_bits'),
    'split': ('warmup_fraction', 'test_fraction', 'seed'),
    'central': ('optimizer', 'learning_rate', 'momentum', 'num_steps',
                'batch_size', 'log_every', 'checkpoint_every', 'schedule',
                'warmup_steps', 'weight_decay', 'grad_clip'),
}


def validate_config(config: ml_collections.ConfigDict) -> list[str]:
  """Checks every key FedUV reads; returns the variant names to run.

  Raises:
    ValueError: naming the key, the bad value and the valid choices.
  """
  options.require(config, REQUIRED_KEYS)
  _check_known_keys(config)
  names = _variant_names(config)
  _check_references(config)
  sizes = verification_data.check_config(config)
  _check_code(config, sizes.num_users)
  _check_scoring(config)
  _check_model(config, sizes.num_users)
  _check_central(config, sizes)
  _check_federated(config, names, sizes)
  _check_dp(config)
  return names


def integer(config, key: str, minimum: int) -> int:
  """The int at dotted `key`, which must be >= minimum."""
  value = options.get(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'config.{key} must be an integer >= {minimum}; got '
                     f'{value!r}.')
  return value


def _check_known_keys(config) -> None:
  """No key FedUV would ignore (a typo, or another experiment's key)."""
  known = {k.split('.')[0] for k in REQUIRED_KEYS + OPTIONAL_KEYS}
  unknown = [f'config.{k}' for k in sorted(set(config) - known)]
  for parent, keys in _KNOWN_SUBKEYS.items():
    unknown += [f'config.{parent}.{k}'
                for k in sorted(set(config[parent]) - set(keys))]
  if unknown:
    raise ValueError(f'The config has keys FedUV does not read: {unknown}. '
                     'Remove them or fix their spelling (the federated '
                     'trainable is fixed by FedUV; algorithm arguments go in '
                     'config.algorithm.<name>).')


def _variant_names(config) -> list[str]:
  names = variants_lib.parse_variants(config.variants)
  unknown = [v for v in names if v not in variants_lib.VARIANTS]
  if unknown or not names or len(set(names)) < len(names):
    raise ValueError(
        f'config.variants={config.variants!r} has unknown, repeated or no '
        f'variants (unknown: {unknown}); choose a comma-separated subset of '
        f'{list(variants_lib.VARIANTS)}.')
  return names


def _check_references(config) -> None:
  refs = variants_lib.references('feduv', config.feduv_references)
  valid = tuple(variants_lib.REFERENCE_SUFFIX)
  if (not refs or len(set(refs)) < len(refs) or
      any(r not in valid for r in refs)):
    raise ValueError(f'config.feduv_references={refs}: choose distinct '
                     f'entries of {valid}.')


def _check_code(config, num_users: int) -> None:
  """The BCH code exists and has room for every user's id and secret bits."""
  if config.code.m not in codes.PRIMITIVE_POLYNOMIALS:
    raise ValueError(f'config.code.m={config.code.m!r} is unsupported; choose '
                     f'one of {sorted(codes.PRIMITIVE_POLYNOMIALS)} (code '
                     'length n = 2^m - 1).')
  integer(config, 'code.t', 1)
  random_bits = integer(config, 'code.min_random_bits', 0)
  try:
    code = codes.bch_code(config.code.m, config.code.t)
  except ValueError as e:
    raise ValueError(f'config.code.t={config.code.t}: {e}') from None
  needed = codes.id_bits(num_users) + random_bits
  if code.k < needed:
    raise ValueError(
        f'config.code (m={config.code.m}, t={config.code.t}) gives '
        f'BCH({code.n},{code.k}) with {code.k} message bits, but '
        f'{num_users} users need {codes.id_bits(num_users)} id bits plus '
        f'config.code.min_random_bits={random_bits}: raise config.code.m or '
        'lower config.code.t or config.code.min_random_bits.')


def _check_scoring(config) -> None:
  """Embedding size, loss margin, operating points and evaluation batch."""
  integer(config, 'embedding_dim', 1)
  integer(config, 'eval_batch_size', 1)
  integer(config, 'seed', 0)
  options.positive(config, 'logit_scale')
  options.in_range(config, 'feduv_margin', 0.0, 1.0, low_inclusive=False)
  options.in_range(config, 'target_tpr', 0.0, 1.0, low_inclusive=False)
  fars = config.fars
  fars = (fars,) if isinstance(fars, (int, float)) else tuple(fars)
  if not fars or any(isinstance(f, bool) or not isinstance(f, (int, float))
                     or not 0 <= f < 1 for f in fars):
    raise ValueError(f'config.fars={fars} must be a non-empty tuple of false '
                     'accept rates in [0, 1).')


def _check_model(config, num_users: int) -> None:
  """Both model kinds build (no init, nothing compiles) from the config."""
  options.one_of(config, 'quant', quantized_training.QUANT_NAMES)
  if config.features == 'log_mel_stats' and not config.model.startswith('mlp'):
    raise ValueError(
        f"config.features='log_mel_stats' gives each utterance as one vector "
        f'of band statistics, which config.model={config.model!r} cannot '
        "take; use an mlp* model or config.features='log_mel' (frames).")
  hooks = quantized_training.get_quant(config.quant).model_kwargs()
  for kind, dim in (('feduv', 2 ** config.code.m - 1),
                    ('softmax', config.embedding_dim)):
    try:
      verification.build_verifier(
          kind, config.model, embedding_dim=dim, num_users=num_users,
          logit_scale=config.logit_scale, **model_kwargs(config), **hooks)
    except (TypeError, ValueError) as e:
      raise ValueError(f'config.model={config.model!r} with config.norm='
                       f'{config.norm!r} and config.model_kwargs='
                       f'{dict(config.model_kwargs)} does not build: {e}'
                       ) from None


def model_kwargs(config) -> dict:
  """`config.norm` and `config.model_kwargs` as backbone arguments."""
  kwargs = {'norm': config.norm}
  for key, value in config.model_kwargs.items():
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  return kwargs


def _check_central(config, sizes: verification_data.SplitSizes) -> None:
  """The centralised baseline's optimiser, steps and batches."""
  options.one_of(config, 'central.optimizer', optim.OPTIMIZERS)
  options.positive(config, 'central.learning_rate')
  options.in_range(config, 'central.momentum', 0.0, 1.0,
                   high_inclusive=False)
  steps = integer(config, 'central.num_steps', 1)
  batch = integer(config, 'central.batch_size', 1)
  if batch > sizes.num_train:
    raise ValueError(f'config.central.batch_size={batch} exceeds the '
                     f'{sizes.num_train} training utterances; lower it.')
  _check_cadence(config, 'central.', steps)
  if 'schedule' in config.central:
    options.one_of(config, 'central.schedule', optim.SCHEDULES)
  for key in ('warmup_steps', 'weight_decay', 'grad_clip'):
    if key in config.central:
      options.non_negative(config, 'central.' + key)


def _check_cadence(config, prefix: str, num_steps: int) -> None:
  """log_every >= 1 and checkpoint_every a multiple of it (or the end)."""
  log_every = integer(config, prefix + 'log_every', 1)
  every = integer(config, prefix + 'checkpoint_every', 1)
  if every % log_every and every < num_steps:
    raise ValueError(f'config.{prefix}checkpoint_every={every} must be a '
                     f'multiple of config.{prefix}log_every={log_every}, so '
                     'a resumed run logs the windows of an uninterrupted one.')


def _check_federated(config, names, sizes) -> None:
  """The round settings each federated variant will run with."""
  training.validate_config(config)
  _check_cadence(config, '', integer(config, 'num_rounds', 1))
  if config.cohort_size > sizes.num_users:
    raise ValueError(f'config.cohort_size={config.cohort_size} exceeds the '
                     f'{sizes.num_users} training users; lower it or raise '
                     'config.data.num_speakers.')
  if any(variants_lib.VARIANTS[n].dp for n in names):
    training.validate_config(with_dp(config, True))


def with_dp(config, enabled: bool) -> ml_collections.ConfigDict:
  """A copy of `config` with `dp.enabled` set (per variant)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.dp.enabled = enabled
  return out


def _check_dp(config) -> None:
  """The DP settings' values, whether or not a DP variant runs."""
  options.in_range(config, 'dp.delta', 0.0, 1.0, low_inclusive=False,
                   high_inclusive=False)
  valid = set(training.dp_options())
  unknown = sorted(set(config.dp) - valid)
  if unknown:
    raise ValueError(f'config.dp has unknown keys {unknown}; valid: '
                     f'{sorted(valid)}.')
  training.dp_config(with_dp(config, True))
