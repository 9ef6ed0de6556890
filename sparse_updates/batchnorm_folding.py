"""Folds inference-mode batch norm into the preceding convolution.

On a device a pre-trained network runs with its batch norms folded into the
convolutions: y = scale * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
is conv(x, W') + b' with W' = W * s, b' = (b - mean) * s + beta, and
s = scale / sqrt(var + eps). The Tiny Training Engine trains the folded
graph (Lin et al., 2022, "On-Device Training Under 256KB Memory", Section
2), and so does TinyTL's bias-only update in effect: a frozen affine map
needs no stored activation in the backward pass, whereas a batch norm that
recomputes statistics stores its input at every layer (see ondevice.cost).

    folded = fold_batch_norm(variables['params'], variables['batch_stats'])
    model = build_model('ds_cnn_s', num_classes, norm='none')
    logits = model.apply({'params': folded}, x)   # == the BN model in eval

The norm of module 'X' is the module 'X_norm' (the naming of every model in
`ondevice.models`); the kernel's last axis is its output channels.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ondevice import train

NORM_SUFFIX = '_norm'


def fold_batch_norm(params: Any, batch_stats: Any,
                    epsilon: float = 1e-5) -> dict[str, Any]:
  """Returns params without '*_norm' modules, their effect folded in.

  Args:
    params: parameters of a model built with norm='batch'.
    batch_stats: its 'batch_stats' collection (running mean and var).
    epsilon: the batch norm's epsilon (flax's default is 1e-5).

  Returns:
    A parameter tree for the same model built with norm='none'.

  Raises:
    ValueError: a norm without statistics, kernel module or bias.
  """
  flat = train.flatten_params(params)
  stats = train.flatten_params(batch_stats)
  norms = sorted({p.rsplit('/', 1)[0] for p in flat
                  if p.rsplit('/', 1)[0].endswith(NORM_SUFFIX)})
  if not norms:
    raise ValueError('No "*_norm" modules in params: nothing to fold. Was '
                     'the model built with norm="batch"?')
  out = {p: v for p, v in flat.items()
         if p.rsplit('/', 1)[0] not in set(norms)}
  for norm in norms:
    conv = norm[:-len(NORM_SUFFIX)]
    needed = {f'{conv}/kernel': flat, f'{conv}/bias': flat,
              f'{norm}/mean': stats, f'{norm}/var': stats}
    missing = [k for k, tree in needed.items() if k not in tree]
    if missing:
      raise ValueError(
          f'Cannot fold {norm!r}: {missing} are missing. Folding needs a '
          'conv with a bias (conv_bias=True) and batch-norm statistics.')
    scale = flat.get(f'{norm}/scale', 1.0)
    beta = flat.get(f'{norm}/bias', 0.0)
    s = scale / jnp.sqrt(stats[f'{norm}/var'] + epsilon)
    out[f'{conv}/kernel'] = flat[f'{conv}/kernel'] * s
    out[f'{conv}/bias'] = (flat[f'{conv}/bias'] -
                           stats[f'{norm}/mean']) * s + beta
  return train.unflatten_params(
      {p: out[p] for p in flat if p in out})
