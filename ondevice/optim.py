"""Optimisers and learning-rate schedules chosen by name in a config.

`build_optimizer(config)` reads `optimizer`, `learning_rate`, `schedule`,
`warmup_steps`, `num_steps`, `weight_decay`, `momentum`, `grad_clip` and
validates each before anything is compiled.
"""
from __future__ import annotations

import optax

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')


def _get(config, key, default):
  return config.get(key, default) if hasattr(config, 'get') else getattr(
      config, key, default)


def build_schedule(config) -> optax.Schedule:
  lr = _get(config, 'learning_rate', None)
  if lr is None or not lr > 0:
    raise ValueError(f'config.learning_rate must be > 0; got {lr}.')
  name = _get(config, 'schedule', 'constant')
  num_steps = int(_get(config, 'num_steps', 1))
  warmup = int(_get(config, 'warmup_steps', 0))
  if warmup < 0:
    raise ValueError(f'config.warmup_steps must be >= 0; got {warmup}.')
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  if name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(warmup, 1),
        decay_steps=max(num_steps, warmup + 1))
  raise ValueError(f'config.schedule={name!r} is unknown; choose one of '
                   f'{SCHEDULES}.')


def build_optimizer(config) -> optax.GradientTransformation:
  """Returns the optax transformation named by `config.optimizer`."""
  name = _get(config, 'optimizer', 'sgd')
  schedule = build_schedule(config)
  weight_decay = float(_get(config, 'weight_decay', 0.0))
  if weight_decay < 0:
    raise ValueError(f'config.weight_decay must be >= 0; got {weight_decay}.')
  momentum = float(_get(config, 'momentum', 0.9))
  if not 0 <= momentum < 1:
    raise ValueError(f'config.momentum must lie in [0, 1); got {momentum}.')
  if name == 'sgd':
    opt = optax.sgd(schedule)
  elif name == 'momentum':
    opt = optax.sgd(schedule, momentum=momentum)
  elif name == 'adam':
    opt = optax.adam(schedule)
  elif name == 'adamw':
    opt = optax.adamw(schedule, weight_decay=weight_decay)
  else:
    raise ValueError(f'config.optimizer={name!r} is unknown; choose one of '
                     f'{OPTIMIZERS}.')
  clip = _get(config, 'grad_clip', 0.0)
  if clip is not None and clip < 0:
    raise ValueError(f'config.grad_clip must be >= 0 (0 = off); got {clip}.')
  if clip:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  if weight_decay and name != 'adamw':
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  return opt
