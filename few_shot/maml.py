"""MAML and its gradient-based relatives as `(init, apply)` factories.

* MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation
  of Deep Networks"): the inner loop takes `inner_steps` SGD steps on the
  support set; the outer loss is the query loss of the adapted parameters,
  differentiated through the inner loop (second order).
* FO-MAML (ibid., section 5.2): the same with the inner gradients treated as
  constants, so the meta-gradient is the query gradient at the adapted point.
* ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse? Towards
  Understanding the Effectiveness of MAML"): the inner loop adapts only the
  head ('classifier/...'); the outer loop still trains everything.
* Meta-SGD (Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for
  Few-Shot Learning"): every adapted leaf has its own learned inner learning
  rate, an array shaped like the leaf, meta-trained with the parameters.

All four are `gradient_meta_learner` with different arguments. The loss is
any `ondevice.train.LossFn` (e.g. `classification_loss(model)` of an int8
model); the outer optimiser is any optax transformation over the
meta-parameters {'params': ..., 'inner_lr': ...}.

Derivation of the meta-gradient the tests check (one SGD inner step, lr a,
support loss S, query loss Q): the adapted point is p' = p - a S'(p), so
dQ(p')/dp = (I - a S''(p)) Q'(p'). FO-MAML drops the Hessian term, giving
Q'(p'); Meta-SGD's gradient for its rate is dQ(p')/da = -S'(p) * Q'(p').
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from few_shot import adaptation
from few_shot import learner as learner_lib
from ondevice import train

Trainable = Sequence[str] | Callable[[str], bool] | None
HEAD_PREFIX = 'classifier/'


def head_only(path: str) -> bool:
  """ANIL's inner-loop predicate: the classifier's leaves."""
  return path.startswith(HEAD_PREFIX) or f'/{HEAD_PREFIX}' in path


def gradient_meta_learner(loss_fn: train.LossFn,
                          outer_optimizer: optax.GradientTransformation, *,
                          inner_lr: float, inner_steps: int,
                          first_order: bool = False,
                          learn_inner_lr: bool = False,
                          inner_trainable: Trainable = None,
                          outer_trainable: Trainable = None,
                          eval_inner_steps: int | None = None,
                          name: str = 'maml') -> learner_lib.MetaLearner:
  """The MAML family.

  Args:
    loss_fn: task loss, `(params, model_state, batch, rng) -> (loss, aux)`.
    outer_optimizer: optax transformation of the meta-parameters.
    inner_lr: inner SGD learning rate (Meta-SGD: the initial value of every
      per-parameter rate).
    inner_steps: inner SGD steps during meta-training (static).
    first_order: drop the second-order term (FO-MAML).
    learn_inner_lr: meta-learn per-parameter inner rates (Meta-SGD).
    inner_trainable: leaves the inner loop adapts (paths or a predicate;
      None: all outer leaves). ANIL passes `head_only`.
    outer_trainable: leaves the outer loop meta-trains (None: all).
    eval_inner_steps: inner steps in `evaluate` and `adapt` (default
      inner_steps).
    name: used in error messages.
  """
  adaptation.check_num_steps('inner_steps', inner_steps)
  eval_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
  adaptation.check_num_steps('eval_inner_steps', eval_steps)
  if not inner_lr > 0:
    raise ValueError(f'{name}: inner_lr must be > 0; got {inner_lr}.')
  paths = _Paths(outer_trainable, inner_trainable, name)
  run_inner = _inner_loop(loss_fn, paths, inner_lr, learn_inner_lr)
  task_gradient = _task_gradient(loss_fn, paths, run_inner, inner_steps,
                                 first_order)

  def init(params, model_state=None) -> learner_lib.MetaState:
    rates = {}
    if learn_inner_lr:
      flat = train.flatten_params(params)
      rates = {k: jnp.full_like(flat[k], inner_lr) for k in paths.inner(params)}
    return learner_lib.init_state(params, model_state, outer_optimizer,
                                  paths.outer(params), rates, name)

  def adapt(state, support, key):
    flat, _ = run_inner(state, train.flatten_params(state.params),
                        state.inner_lr, support, key, eval_steps, True)
    return train.unflatten_params(flat)

  update = learner_lib.make_update(outer_optimizer, paths.outer)
  return learner_lib.MetaLearner(
      init=init, apply=learner_lib.make_apply(task_gradient, update),
      evaluate=learner_lib.make_evaluate(loss_fn, adapt),
      task_gradient=task_gradient, update=update, adapt=adapt)


class _Paths:
  """The leaves the outer loop meta-trains and the inner loop adapts."""

  def __init__(self, outer_trainable: Trainable, inner_trainable: Trainable,
               name: str):
    self._outer, self._inner, self._name = (outer_trainable, inner_trainable,
                                            name)

  def outer(self, params) -> tuple[str, ...]:
    return learner_lib.resolve_paths(params, self._outer,
                                     f'{self._name}: outer_trainable')

  def inner(self, params) -> tuple[str, ...]:
    if self._inner is None:
      return self.outer(params)
    return learner_lib.resolve_paths(params, self._inner,
                                     f'{self._name}: inner_trainable')


def _inner_loop(loss_fn, paths: _Paths, inner_lr: float,
                learn_inner_lr: bool):
  """`run_inner(state, flat, rates, support, key, num_steps, first_order)`:
  adapts the inner leaves of the flat params `flat`; returns (full flat
  params, support losses)."""

  def run_inner(state, flat, rates, support, key, num_steps, first):
    inner = {k: flat[k] for k in paths.inner(state.params)}
    rest = {k: v for k, v in flat.items() if k not in inner}
    lrs = rates if learn_inner_lr else {k: inner_lr for k in inner}

    def support_loss(p, rng):
      return loss_fn(train.unflatten_params({**rest, **p}), state.model_state,
                     support, rng)[0]

    adapted, losses = adaptation.sgd_inner_loop(support_loss, inner, lrs, key,
                                                num_steps, first)
    return {**rest, **adapted}, losses
  return run_inner


def _task_gradient(loss_fn, paths: _Paths, run_inner, inner_steps: int,
                   first_order: bool):
  """One task's meta-gradient: the query loss after the inner loop,
  differentiated with respect to the meta-parameters."""

  def task_gradient(state, task, key):
    trainable, frozen = train.split_params(state.params,
                                           paths.outer(state.params))
    inner_key, query_key = jax.random.split(key)

    def meta_loss(meta):
      flat, losses = run_inner(state, {**frozen, **meta['params']},
                               meta['inner_lr'], task['support'], inner_key,
                               inner_steps, first_order)
      loss, (sums, _) = loss_fn(train.unflatten_params(flat),
                                state.model_state, task['query'], query_key)
      metrics = {'loss': loss,
                 'query_accuracy': sums['correct'] / jnp.maximum(
                     sums['count'], 1.0),
                 'support_loss_first': losses[0],
                 'support_loss_last': losses[-1]}
      return loss, metrics

    meta = {'params': trainable, 'inner_lr': state.inner_lr}
    (_, metrics), grads = jax.value_and_grad(meta_loss, has_aux=True)(meta)
    return grads, metrics
  return task_gradient


def maml(loss_fn, outer_optimizer, *, inner_lr, inner_steps, **kwargs):
  """Second-order MAML (Finn et al. 2017)."""
  return gradient_meta_learner(loss_fn, outer_optimizer, inner_lr=inner_lr,
                               inner_steps=inner_steps, first_order=False,
                               name='maml', **kwargs)


def fomaml(loss_fn, outer_optimizer, *, inner_lr, inner_steps, **kwargs):
  """First-order MAML (Finn et al. 2017, section 5.2)."""
  return gradient_meta_learner(loss_fn, outer_optimizer, inner_lr=inner_lr,
                               inner_steps=inner_steps, first_order=True,
                               name='fomaml', **kwargs)


def anil(loss_fn, outer_optimizer, *, inner_lr, inner_steps,
         head: Trainable = head_only, **kwargs):
  """ANIL (Raghu et al. 2020): the inner loop adapts the head only."""
  return gradient_meta_learner(loss_fn, outer_optimizer, inner_lr=inner_lr,
                               inner_steps=inner_steps, inner_trainable=head,
                               name='anil', **kwargs)


def meta_sgd(loss_fn, outer_optimizer, *, inner_lr, inner_steps, **kwargs):
  """Meta-SGD (Li et al. 2017): learned per-parameter inner rates."""
  return gradient_meta_learner(loss_fn, outer_optimizer, inner_lr=inner_lr,
                               inner_steps=inner_steps, learn_inner_lr=True,
                               name='meta_sgd', **kwargs)
