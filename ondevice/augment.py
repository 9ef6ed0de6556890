"""SpecAugment-style views of feature clips, for any loss of `ondevice.train`.

Time and frequency masks (Park et al., Interspeech 2019, arXiv:1904.08779)
and a random circular time shift of features [B, T, F, ...], keyed by the
training step's rng, so a resumed run draws the same views:

    loss_fn = augment.with_augmentation(loss_fn, time_mask=12, freq_mask=6,
                                        max_shift=10)

Masked cells are set to 0, the mean of normalised features
(`ondevice.data` normalises speech features per mel band). Used by
centralised pre-training (`config.augment` of `central.supervised`) and by
continual learning's strong views (`continual.objectives`).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from ondevice import train

FIELDS = ('time_mask', 'freq_mask', 'max_shift')


def augment(x: jax.Array, key: jax.Array, *, time_mask: int = 12,
            freq_mask: int = 6, max_shift: int = 10) -> jax.Array:
  """SpecAugment masks and a circular time shift of features [B, T, F, ...].

  Each clip gets one time mask of width U{0..time_mask}, one frequency mask
  of width U{0..freq_mask} (filled with 0) and a shift of
  U{-max_shift..max_shift} frames; trailing axes (channels) are masked
  alike.
  """
  if x.ndim < 3:
    raise ValueError(f'augment expects features [batch, time, freq, ...]; '
                     f'got shape {x.shape}.')
  batch, frames, bands = x.shape[:3]
  keys = jax.random.split(key, 5)

  def band_mask(k_width, k_start, size, width_max):
    width = jax.random.randint(k_width, (batch, 1), 0, width_max + 1)
    start = jax.random.randint(k_start, (batch, 1), 0,
                               jnp.maximum(size - width + 1, 1))
    pos = jnp.arange(size)[None]
    return (pos >= start) & (pos < start + width)

  t_mask = band_mask(keys[0], keys[1], frames, time_mask)
  f_mask = band_mask(keys[2], keys[3], bands, freq_mask)
  shift = jax.random.randint(keys[4], (batch,), -max_shift, max_shift + 1)
  x = jax.vmap(lambda xi, s: jnp.roll(xi, s, axis=0))(x, shift)
  keep = ~(t_mask[:, :, None] | f_mask[:, None, :])
  return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 3)), x, 0.0)


def with_augmentation(loss_fn: train.LossFn, **kwargs) -> train.LossFn:
  """Applies `augment` to batch['x'] (keyed by the step's rng) before loss_fn.

  Wrap a regularised loss so that the regulariser sees the same view.
  """
  def wrapped(params, model_state, batch, rng):
    aug_key, rng = jax.random.split(rng)
    batch = dict(batch, x=augment(batch['x'], aug_key, **kwargs))
    return loss_fn(params, model_state, batch, rng)
  return wrapped


def is_enabled(settings: Mapping[str, int] | None) -> bool:
  """Whether a config's `augment` section changes any input."""
  return bool(settings) and any(settings.get(k, 0) for k in FIELDS)


def validate(settings: Mapping[str, int], key: str = 'config.augment',
             feature_shape: tuple[int, ...] | None = None) -> None:
  """Checks an `augment` section: known fields, non-negative integers that
  fit the features [T, F, ...] when their shape is given."""
  unknown = sorted(set(settings) - set(FIELDS))
  if unknown:
    raise ValueError(f'{key} has unknown fields {unknown}; valid: '
                     f'{list(FIELDS)}.')
  for name in FIELDS:
    value = settings.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'{key}.{name} must be a non-negative integer; got '
                       f'{value!r}.')
  if feature_shape is None or not is_enabled(settings):
    return
  if len(feature_shape) < 2:
    raise ValueError(f'{key} masks time and frequency, but the features '
                     f'have shape {tuple(feature_shape)} (need [T, F, ...]).')
  for name, size, axis in (('time_mask', feature_shape[0], 'frames'),
                           ('max_shift', feature_shape[0], 'frames'),
                           ('freq_mask', feature_shape[1], 'bands')):
    if settings.get(name, 0) >= size:
      raise ValueError(f'{key}.{name}={settings[name]} must be below the '
                       f'{size} {axis} of the features.')
