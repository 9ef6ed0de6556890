"""The task loss of continual learning on a device, and its input views.

After pre-training, a device fine-tunes with batch-norm statistics frozen:
the norms use the pre-trained running averages in training as at inference,
so that a few dozen clips of one user cannot overwrite statistics that every
other speaker's accuracy depends on (statistics adaptation is a separate,
explicit baseline: `tta.adapt_batch_norm`). Models without batch norm behave
the same either way.

Training inputs are augmented with SpecAugment-style time and frequency
masks (Park et al., Interspeech 2019, arXiv:1904.08779) and a random time
shift, the strong view of FixMatch-style self-training (Sohn et al., NeurIPS
2020, arXiv:2001.07685): pseudo-labels come from the clean clip, the model
learns them from perturbed views of it.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ondevice import train

PyTree = Any


def logits_fn(model: nn.Module):
  """`(params, model_state, x, rng) -> logits` in inference mode."""
  def apply(params, model_state, x, rng):
    rngs = None
    if rng is not None:
      dropout_rng, quant_rng = jax.random.split(rng)
      rngs = {'dropout': dropout_rng, 'quant': quant_rng}
    return model.apply({'params': params, **model_state}, x, train=False,
                       rngs=rngs)
  return apply


def embedding_fn(model: nn.Module):
  """`(params, model_state, x) -> embeddings`: the classifier's input."""
  def apply(params, model_state, x):
    return model.apply({'params': params, **model_state}, x, train=False,
                       method=model.features)
  return apply


def frozen_stats_loss(model: nn.Module, label_smoothing: float = 0.0
                      ) -> train.LossFn:
  """Masked softmax cross-entropy with the norms' statistics frozen.

  Same contract as `ondevice.train.classification_loss`; the model state
  passes through unchanged.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must lie in [0, 1); got '
                     f'{label_smoothing}.')
  apply = logits_fn(model)

  def loss_fn(params, model_state, batch, rng):
    logits = apply(params, model_state, batch['x'], rng)
    targets = optax.smooth_labels(
        jax.nn.one_hot(batch['y'], logits.shape[-1]), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    loss = train.masked_mean(per_example, batch['mask'])
    sums = train.classification_metrics(logits, batch['y'], batch['mask'])
    return loss, (sums, model_state)

  return loss_fn


def augment(x: jax.Array, key: jax.Array, *, time_mask: int = 12,
            freq_mask: int = 6, max_shift: int = 10) -> jax.Array:
  """SpecAugment masks and a circular time shift of features [B, T, F].

  Each clip gets one time mask of width U{0..time_mask}, one frequency mask
  of width U{0..freq_mask} (filled with 0, the mean of normalised features)
  and a shift of U{-max_shift..max_shift} frames.
  """
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
