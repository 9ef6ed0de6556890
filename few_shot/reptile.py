"""Reptile as an `(init, apply)` factory.

Nichol, Achiam & Schulman (2018), "On First-Order Meta-Learning Algorithms":
for each task, train a copy of the initialisation for k steps with an
ordinary optimiser (phi -> W), then move the initialisation towards the
adapted weights, phi <- phi + epsilon * mean_tasks(W - phi) (their batched
version, Algorithm 2).

Here the task's pseudo-gradient is `phi - W`, so the outer step is any optax
transformation of it: `optax.sgd(epsilon)` is exactly the paper's update,
and other optimisers give the variants the paper mentions (Adam on the
pseudo-gradient). Because a pseudo-gradient is just a parameter delta, the
same `task_gradient` is a federated client update: averaging it over
speakers is federated Reptile, i.e. FedAvg with an inner-loop client.

During meta-training the inner loop trains on the whole task (support and
query: Reptile needs no held-out split); `evaluate` and `adapt` train on the
support set only, as at meta-test time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import optax

from few_shot import adaptation
from few_shot import learner as learner_lib
from ondevice import train

Trainable = Sequence[str] | Callable[[str], bool] | None


def reptile(loss_fn: train.LossFn,
            outer_optimizer: optax.GradientTransformation, *,
            inner_optimizer: optax.GradientTransformation,
            inner_steps: int, trainable: Trainable = None,
            train_on_query: bool = True,
            eval_inner_steps: int | None = None) -> learner_lib.MetaLearner:
  """Builds Reptile.

  Args:
    loss_fn: task loss (see `ondevice.train.LossFn`).
    outer_optimizer: applied to the pseudo-gradient phi - W;
      `optax.sgd(epsilon)` is Nichol et al.'s update.
    inner_optimizer: the per-task optimiser, fresh for every task (e.g.
      `optax.sgd(0.1)`, or Adam as in the paper).
    inner_steps: full-batch inner steps (static).
    trainable: leaves that adapt and are meta-trained (None: all).
    train_on_query: during meta-training, adapt on support and query.
    eval_inner_steps: inner steps of `evaluate` / `adapt` (default
      inner_steps).
  """
  eval_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
  adaptation.check_num_steps('inner_steps', inner_steps)
  adaptation.check_num_steps('eval_inner_steps', eval_steps)

  def paths_of(params):
    return learner_lib.resolve_paths(params, trainable, 'reptile: trainable')

  def finetune(params, num_steps):
    return adaptation.make_finetune(loss_fn, inner_optimizer,
                                    paths_of(params), num_steps)

  def init(params, model_state=None) -> learner_lib.MetaState:
    return learner_lib.init_state(params, model_state, outer_optimizer,
                                  paths_of(params), {}, 'reptile')

  def adapt(state, support, key):
    params, _, _ = finetune(state.params, eval_steps)(
        state.params, state.model_state, support, key)
    return params

  task_gradient = _task_gradient(loss_fn, paths_of, finetune, inner_steps,
                                 train_on_query)
  update = learner_lib.make_update(outer_optimizer, paths_of)
  return learner_lib.MetaLearner(
      init=init, apply=learner_lib.make_apply(task_gradient, update),
      evaluate=learner_lib.make_evaluate(loss_fn, adapt),
      task_gradient=task_gradient, update=update, adapt=adapt)


def _task_gradient(loss_fn, paths_of, finetune, inner_steps: int,
                   train_on_query: bool):
  """One task's pseudo-gradient phi - W and the adapted model's query
  metrics."""

  def task_gradient(state, task, key):
    inner_key, query_key = jax.random.split(key)
    batch = (adaptation.concat_batches(task['support'], task['query'])
             if train_on_query else task['support'])
    adapted, _, losses = finetune(state.params, inner_steps)(
        state.params, state.model_state, batch, inner_key)
    start, _ = train.split_params(state.params, paths_of(state.params))
    end, _ = train.split_params(adapted, paths_of(state.params))
    grads = {'params': {k: start[k] - end[k] for k in start}, 'inner_lr': {}}
    query = adaptation.batch_metrics(loss_fn, adapted, state.model_state,
                                     task['query'], query_key)
    metrics = {'loss': query['loss'], 'query_accuracy': query['accuracy'],
               'support_loss_first': losses[0],
               'support_loss_last': losses[-1]}
    return grads, metrics
  return task_gradient
