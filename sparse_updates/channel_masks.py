"""Partial-channel updates: a fraction of a leaf's output channels trains.

The Tiny Training Engine (Lin et al., 2022, "On-Device Training Under 256KB
Memory", Section 3.2) updates, in some layers, only a subset of the output
channels, chosen by weight magnitude or at random (their Fig. 6 finds the
two close). A rule value f in (0, 1] (see `sparse_updates.rules`) asks for
this; `update_masks` picks the channels and `masked_optimizer` wraps any
optax optimiser so that only they move:

    masks = update_masks(params, rules, method='magnitude')
    opt = masked_optimizer(optax.adam(1e-3), masks)
    step = train.make_train_step(loss_fn, opt, trainable_paths(params, rules))

What this saves, honestly. The mask is applied to the gradient (before the
optimiser) and to the update (after it), within a leaf. JAX still forms the
*full* weight gradient of a masked leaf, so the layer's input activation is
stored for it and its gradient buffer is full size; optax keeps full-size
moments too. Training memory is therefore that of training the whole leaf
(`ondevice.cost` counts it so). What it does save: the values a federated
client sends (only the chosen channels: `cost.bytes_of_trainable(...,
masks=masks)`), and on an engine that compiles the sparse backward, as TTE
does, the compute and memory of the other channels' weight gradients
(dW[..., idx] = x^T dy[..., idx]), which XLA computes and then discards.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ondevice import train
from sparse_updates import rules as rules_lib

METHODS = ('magnitude', 'random')


def _scores(leaf: np.ndarray) -> np.ndarray:
  """L2 norm of each output channel (the last axis) of a leaf."""
  leaf = np.asarray(leaf, np.float64)
  if leaf.ndim == 1:
    return np.abs(leaf)
  return np.sqrt(np.sum(leaf.reshape(-1, leaf.shape[-1]) ** 2, axis=0))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
  # Stable: ties go to the lower channel index, so masks are reproducible.
  order = np.argsort(-scores, kind='stable')
  mask = np.zeros(scores.shape, bool)
  mask[order[:k]] = True
  return mask


def update_masks(params: Any, rules: rules_lib.Rules,
                 method: str = 'magnitude',
                 key: jax.Array | None = None) -> dict[str, jax.Array]:
  """Boolean output-channel masks for the leaves trained by a fraction.

  Args:
    params: parameter tree (pre-trained, for magnitude selection).
    rules: ordered rules; leaves whose value is a float < 1 get a mask.
    method: 'magnitude' keeps the channels of largest L2 norm; 'random'
      draws them with `key`.
    key: PRNG key, required for 'random' (runs must be reproducible).

  Returns:
    {path: bool [C]} where C is the leaf's last axis; a leaf's bias uses the
    channels its module's kernel chose when both are fractional.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown channel selection {method!r}; choose one of '
                     f'{METHODS}.')
  if method == 'random' and key is None:
    raise ValueError("method='random' needs an explicit PRNG key: pass "
                     'key=jax.random.key(seed).')
  fractions = rules_lib.channel_fractions(params, rules)
  flat = train.flatten_params(params)
  by_module: dict[str, np.ndarray] = {}
  # Kernels first, so that a bias can reuse its kernel's channels.
  ordered = sorted(fractions, key=lambda p: (not p.endswith('/kernel'), p))
  masks = {}
  for index, path in enumerate(ordered):
    leaf = flat[path]
    channels = int(leaf.shape[-1])
    k = max(1, int(round(fractions[path] * channels)))
    module = path.rsplit('/', 1)[0]
    reuse = by_module.get(module)
    if reuse is not None and reuse.shape == (channels,):
      mask = reuse
    elif method == 'magnitude':
      mask = _top(_scores(leaf), k)
    else:
      draw = np.asarray(jax.random.uniform(jax.random.fold_in(key, index),
                                           (channels,)))
      mask = _top(draw, k)
    by_module.setdefault(module, mask)
    masks[path] = jnp.asarray(mask)
  return masks


def _apply_masks(tree: Mapping[str, jax.Array],
                 masks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  unknown = sorted(set(masks) - set(tree))
  if unknown:
    raise ValueError(
        f'Update masks name {unknown}, which are not trainable leaves '
        f'({sorted(tree)}); build masks from the same rules as the '
        'trainable paths.')
  out = {}
  for path, value in tree.items():
    if path in masks:
      mask = masks[path]
      if mask.shape != value.shape[-1:]:
        raise ValueError(f'Mask of {path!r} has shape {mask.shape}; the leaf '
                         f'has {value.shape[-1]} output channels.')
      value = jnp.where(mask, value, jnp.zeros_like(value))
    out[path] = value
  return out


def masked_optimizer(optimizer: optax.GradientTransformation,
                     masks: Mapping[str, jax.Array]
                     ) -> optax.GradientTransformation:
  """Wraps `optimizer` so that masked-out channels never move.

  The gradient is masked before the optimiser (so momentum and Adam moments
  of frozen channels stay zero) and the update after it (so weight decay or
  any other term cannot move them either). Works on the flat {path: array}
  trees that `ondevice.train.make_train_step` passes to optimisers.
  """
  masks = {p: jnp.asarray(m, bool) for p, m in masks.items()}

  def init_fn(params):
    return optimizer.init(params)

  def update_fn(updates, state, params=None):
    updates, state = optimizer.update(_apply_masks(updates, masks), state,
                                      params)
    return _apply_masks(updates, masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def masked_fraction(params: Any, masks: Mapping[str, jax.Array]
                    ) -> dict[str, float]:
  """{path: fraction of the leaf's elements that the mask lets train}."""
  flat = train.flatten_params(params)
  return {p: float(np.mean(np.asarray(m))) for p, m in masks.items()
          if p in flat}
