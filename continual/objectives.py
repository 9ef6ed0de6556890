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
import optax

from ondevice import augment as augment_lib
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


# The views live in ondevice/augment.py, shared with centralised
# pre-training; these names stay for continual learning's callers.
augment = augment_lib.augment
with_augmentation = augment_lib.with_augmentation
