"""Test-time adaptation baselines: adapt from inference inputs alone.

Two label-free baselines that continual pseudo-labelling is compared with:

* Batch-norm statistics adaptation (Schneider et al., NeurIPS 2020,
  "Improving robustness against common corruptions by covariate shift
  adaptation", arXiv:2006.16971): replace each batch-norm layer's running
  mean and variance by a mix of the source statistics and those of the
  target data, mu = N / (N + n) * mu_source + n / (N + n) * mu_target (the
  same for the variance), where n is the number of target examples and the
  prior strength N says how many examples the source statistics are worth.
  N = 0 uses the target statistics alone.
* TENT (Wang et al., ICLR 2021, "Tent: Fully Test-Time Adaptation by
  Entropy Minimization", arXiv:2006.10726): minimise the mean entropy of the
  predictions on test batches, normalising with the batch's statistics and
  training only the norms' scale and bias (`norm_paths`). The running
  statistics follow the test batches as in any train-mode step.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ondevice import train

PyTree = Any
NORM_PARAM = re.compile(r'(.*/)?[^/]*norm[^/]*/(scale|bias)')


def norm_paths(params: PyTree) -> tuple[str, ...]:
  """Paths of every normalisation scale and bias, e.g. 'pw3_norm/scale'."""
  paths = tuple(p for p in sorted(train.flatten_params(params))
                if NORM_PARAM.fullmatch(p))
  if not paths:
    raise ValueError('The model has no norm scale or bias (no parameter '
                     'path like "conv0_norm/scale"); TENT needs a model '
                     'built with norm="batch", "layer" or "group".')
  return paths


def _target_statistics(model: nn.Module, params: PyTree, stats: PyTree,
                       x: jax.Array, mask: jax.Array) -> PyTree:
  """Batch statistics of every batch-norm layer on x, whatever its momentum.

  A train-mode step updates r <- m * r + (1 - m) * b. Running it from r = 0
  gives (1 - m) b and from r = 1 gives m + (1 - m) b, which yields both m
  and b without knowing the layer's momentum.
  """
  def update(fill):
    start = jax.tree.map(lambda s: jnp.full_like(s, fill), stats)
    kwargs = {'mask': mask} if getattr(model, 'accepts_mask', False) else {}
    _, new = model.apply({'params': params, 'batch_stats': start}, x,
                         train=True, mutable=['batch_stats'], **kwargs)
    return new['batch_stats']
  from_zero, from_one = update(0.0), update(1.0)
  return jax.tree.map(lambda a, b: a / jnp.maximum(1.0 - (b - a), 1e-12),
                      from_zero, from_one)


def adapt_batch_norm(model: nn.Module, params: PyTree, model_state: PyTree,
                     x: jax.Array, prior_strength: float = 16.0,
                     mask: jax.Array | None = None) -> PyTree:
  """Schneider et al.'s covariate-shift adaptation of batch-norm statistics.

  Args:
    model: a flax module with batch norm.
    params: its params (unchanged).
    model_state: {'batch_stats': source statistics, ...}.
    x: target inputs [n, ...], e.g. the clips a device has heard.
    prior_strength: N, the weight of the source statistics in examples.
    mask: optional [n] example mask (padding excluded).

  Returns:
    A new model_state with the mixed statistics.
  """
  if 'batch_stats' not in model_state:
    raise ValueError('adapt_batch_norm needs a model with batch norm (a '
                     "'batch_stats' collection); build it with "
                     "norm='batch' or use TENT instead.")
  if prior_strength < 0:
    raise ValueError(f'prior_strength must be >= 0; got {prior_strength}.')
  mask = jnp.ones(len(x), jnp.float32) if mask is None else jnp.asarray(mask)
  source = model_state['batch_stats']
  target = _target_statistics(model, params, source, x, mask)
  n = jnp.sum(mask)
  w_source = prior_strength / (prior_strength + n)
  mixed = jax.tree.map(lambda s, t: w_source * s + (1.0 - w_source) * t,
                       source, target)
  return {**model_state, 'batch_stats': mixed}


def entropy(logits: jax.Array) -> jax.Array:
  """Shannon entropy (nats) of softmax(logits) per row."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_loss(model: nn.Module) -> train.LossFn:
  """TENT's objective: masked mean prediction entropy, in train mode.

  Reads no label. Metric sums: 'loss_sum' (entropy) and 'count'.
  """
  def loss_fn(params, model_state, batch, rng):
    mask = batch['mask']
    variables = {'params': params, **model_state}
    kwargs = {'mask': mask} if getattr(model, 'accepts_mask', False) else {}
    dropout_rng, quant_rng = jax.random.split(rng)
    rngs = {'dropout': dropout_rng, 'quant': quant_rng}
    if model_state:
      logits, new_state = model.apply(variables, batch['x'], train=True,
                                      rngs=rngs, mutable=list(model_state),
                                      **kwargs)
      new_state = dict(new_state)
    else:
      logits = model.apply(variables, batch['x'], train=True, rngs=rngs,
                           **kwargs)
      new_state = model_state
    per_example = entropy(logits)
    m = mask.astype(jnp.float32)
    sums = {'loss_sum': jnp.sum(per_example * m), 'count': jnp.sum(m)}
    return train.masked_mean(per_example, mask), (sums, new_state)
  return loss_fn


def make_tent_step(model: nn.Module, optimizer: optax.GradientTransformation,
                   params: PyTree):
  """A pure `(state, batch, rng) -> (state, metrics)` TENT step.

  Only `norm_paths(params)` train; build the state with
  `train.state_from_params(params, model_state, optimizer,
  trainable=norm_paths(params))`.
  """
  return train.make_train_step(entropy_loss(model), optimizer,
                               norm_paths(params))
