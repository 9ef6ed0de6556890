"""Inner loops: adapting parameters to one task's support set.

Two loops, both `lax.scan`s over full-batch steps on the support set:

* `sgd_inner_loop`: plain gradient descent over a flat dict of parameters,
  differentiable end to end, so MAML (Finn et al. 2017, "Model-Agnostic
  Meta-Learning for Fast Adaptation of Deep Networks") can take the
  second-order meta-gradient through it; `first_order=True` stops the
  gradient of the inner gradients (FO-MAML, ibid. section 5.2), and
  per-parameter learning rates give Meta-SGD (Li et al. 2017, "Meta-SGD:
  Learning to Learn Quickly for Few-Shot Learning").
* `make_finetune`: the ordinary train step of `ondevice.train` with any optax
  optimiser and any trainable subset, scanned over steps. Reptile's inner
  loop (Nichol et al. 2018, "On First-Order Meta-Learning Algorithms") and
  per-user personalisation use it; it is not meant to be differentiated.

Everything here is pure and vmaps over a leading task (or user) axis.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import optax

from ondevice import train

FlatParams = dict[str, jax.Array]


def check_num_steps(name: str, num_steps: int) -> None:
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f'{name} must be a positive int (the number of inner '
                     f'steps); got {num_steps!r}.')


def sgd_inner_loop(loss_of: Callable[[FlatParams, jax.Array], jax.Array],
                   params: FlatParams, learning_rates: Mapping[str, Any],
                   key: jax.Array, num_steps: int, first_order: bool = False
                   ) -> tuple[FlatParams, jax.Array]:
  """`num_steps` steps of p <- p - lr * grad loss_of(p), as a lax.scan.

  Args:
    loss_of: `(flat params, rng) -> scalar` support loss; everything else
      (frozen params, the batch) is closed over.
    params: the adapted leaves, flat {path: array}.
    learning_rates: {path: scalar or array shaped like the leaf}; arrays are
      Meta-SGD's per-parameter rates.
    key: PRNG key; step i uses the i-th split.
    num_steps: inner steps (static).
    first_order: treat each inner gradient as a constant of the outer
      differentiation, which drops MAML's second-order term.

  Returns:
    (adapted params, the support loss before each step [num_steps]).
  """
  def body(p, step_key):
    loss, grads = jax.value_and_grad(loss_of)(p, step_key)
    if first_order:
      grads = lax.stop_gradient(grads)
    return {k: p[k] - learning_rates[k] * grads[k] for k in p}, loss

  return lax.scan(body, dict(params), jax.random.split(key, num_steps))


def make_finetune(loss_fn: train.LossFn,
                  optimizer: optax.GradientTransformation,
                  trainable: Sequence[str] | None, num_steps: int):
  """Builds `finetune(params, model_state, batch, key)`.

  Args:
    loss_fn: see `ondevice.train.LossFn`.
    optimizer: optax transformation, with fresh state for every call.
    trainable: paths that adapt (None: all); the others keep their values
      and their gradients are never formed.
    num_steps: full-batch steps on `batch` (static).

  Returns:
    `finetune(params, model_state, batch, key) -> (params, model_state,
    losses [num_steps])`, pure and vmappable.
  """
  check_num_steps('num_steps', num_steps)
  step = train.make_train_step(loss_fn, optimizer, trainable)

  def finetune(params, model_state, batch, key):
    state = train.state_from_params(params, model_state, optimizer, trainable)

    def body(s, step_key):
      s, metrics = step(s, batch, step_key)
      return s, metrics['loss']

    state, losses = lax.scan(body, state, jax.random.split(key, num_steps))
    return state.params, state.model_state, losses

  return finetune


def concat_batches(*batches: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Joins {'x', 'y', 'mask'} batches along the example axis."""
  return {k: jnp.concatenate([b[k] for b in batches]) for k in
          ('x', 'y', 'mask')}


def batch_metrics(loss_fn: train.LossFn, params, model_state,
                  batch: Mapping[str, jax.Array], key: jax.Array
                  ) -> dict[str, jax.Array]:
  """Loss and accuracy of `params` on `batch` (means over real examples).

  Uses the training loss function, which is exact for the stateless models
  (norm 'group', 'layer' or 'none') that meta-learning requires.
  """
  loss, (sums, _) = loss_fn(params, model_state, batch, key)
  return {'loss': loss,
          'accuracy': sums['correct'] / jnp.maximum(sums['count'], 1.0)}
