"""The contract every meta-learner shares, and the vmapped outer step.

A meta-learner is a factory returning a `MetaLearner` whose first two fields
are the `(init, apply)` pair of `fedjax_ext` algorithms:

    learner = maml.maml(loss_fn, optax.adam(1e-3), inner_lr=0.1,
                        inner_steps=3)
    state = learner.init(params)
    state, metrics = learner.apply(state, tasks, key)   # tasks: [T, ...]

`apply` is built from two pure halves that are exposed as well:

* `task_gradient(state, task, key) -> (grads, metrics)`: one task's
  (pseudo-)gradient of the meta-parameters. This is what a client computes
  in Per-FedAvg (Fallah et al. 2020, "Personalized Federated Learning with
  Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach") or in
  federated Reptile, where clients are speakers and tasks are their data.
* `update(state, grads) -> state`: the outer (server) optimiser step.

`apply` vmaps `task_gradient` over the task axis and averages, which is the
same arithmetic as `python_loop_apply` (a Python loop over tasks of the same
code), only one compiled call. `evaluate` adapts to each task's support set
and scores the query set; `adapt` returns the adapted parameter tree of one
task (used for personalisation).

Batch norm and meta-learning do not mix: statistics of a 5-shot support set
are noisy, differ between support and query, and make the inner loop depend
on batch composition (see Antoniou et al. 2019, "How to train your MAML").
The learners therefore require models with norm='group', 'layer' or 'none'
(no 'batch_stats' collection) and raise otherwise.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from few_shot import adaptation
from ondevice import train

PyTree = Any


class MetaState(NamedTuple):
  """State of a meta-learner.

  Attributes:
    params: the meta-learned initialisation (full parameter tree).
    model_state: non-parameter collections; must be empty (see module doc).
    opt_state: outer optimiser state over the meta-parameters
      {'params': trainable flat params, 'inner_lr': inner_lr}.
    inner_lr: Meta-SGD's per-parameter inner learning rates, flat
      {path: array like the leaf}; {} for the other learners.
    step: int32 scalar, outer steps taken.
  """
  params: PyTree
  model_state: PyTree
  opt_state: optax.OptState
  inner_lr: dict[str, jax.Array]
  step: jax.Array


class MetaLearner(NamedTuple):
  """init(params, model_state=None) -> MetaState; jitted apply(state, tasks,
  key) -> (state, metrics); jitted evaluate(state, tasks, key) -> per-task
  metrics; task_gradient and update as in the module docstring;
  adapt(state, support, key) -> adapted parameter tree."""
  init: Callable[..., MetaState]
  apply: Callable[..., tuple[MetaState, dict[str, jax.Array]]]
  evaluate: Callable[..., dict[str, jax.Array]]
  task_gradient: Callable[..., tuple[PyTree, dict[str, jax.Array]]]
  update: Callable[[MetaState, PyTree], MetaState]
  adapt: Callable[..., PyTree]


def require_stateless(model_state: PyTree, learner: str) -> dict:
  """Raises unless `model_state` is empty (no batch norm statistics)."""
  model_state = dict(model_state or {})
  if jax.tree.leaves(model_state):
    raise ValueError(
        f'{learner} needs a model without batch statistics, but the model '
        f'state has collections {sorted(model_state)}; build the model with '
        "norm='group' (or 'layer' / 'none'): batch norm over a few-shot "
        'support set is unstable and couples the tasks of a batch.')
  return {}


def resolve_paths(params: PyTree, trainable, what: str) -> tuple[str, ...]:
  """`train.resolve_trainable` with an error that names the argument."""
  paths = train.resolve_trainable(params, trainable)
  if not paths:
    raise ValueError(f'{what} selects no parameter; valid paths are '
                     f'{sorted(train.flatten_params(params))}.')
  return paths


def init_state(params: PyTree, model_state: PyTree,
               optimizer: optax.GradientTransformation,
               outer_paths: Sequence[str], inner_lr: dict[str, jax.Array],
               learner: str) -> MetaState:
  """A MetaState at step 0 whose optimiser covers the meta-parameters."""
  model_state = require_stateless(model_state, learner)
  trainable, _ = train.split_params(params, outer_paths)
  meta = {'params': trainable, 'inner_lr': dict(inner_lr)}
  return MetaState(params=params, model_state=model_state,
                   opt_state=optimizer.init(meta), inner_lr=dict(inner_lr),
                   step=jnp.zeros((), jnp.int32))


def make_update(optimizer: optax.GradientTransformation,
                outer_paths_of: Callable[[PyTree], Sequence[str]]):
  """Builds `update(state, grads) -> state` for grads shaped like
  {'params': flat trainable, 'inner_lr': flat} (the meta-parameters)."""
  def update(state: MetaState, grads: PyTree) -> MetaState:
    trainable, frozen = train.split_params(state.params,
                                           outer_paths_of(state.params))
    meta = {'params': trainable, 'inner_lr': state.inner_lr}
    updates, opt_state = optimizer.update(grads, state.opt_state, meta)
    meta = optax.apply_updates(meta, updates)
    return MetaState(params=train.merge_params(meta['params'], frozen),
                     model_state=state.model_state, opt_state=opt_state,
                     inner_lr=meta['inner_lr'], step=state.step + 1)
  return update


def _num_tasks(tasks: PyTree) -> int:
  sizes = {x.shape[0] for x in jax.tree.leaves(tasks)}
  if len(sizes) != 1:
    raise ValueError(f'Every leaf of a task batch needs the same leading '
                     f'(task) axis; got sizes {sorted(sizes)}.')
  return sizes.pop()


def _mean(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def make_apply(task_gradient, update):
  """The jitted outer step: vmap of `task_gradient` over tasks, mean, update.

  The meta-gradient is the mean of the per-task gradients (Finn et al.
  2017, Algorithm 1, line 10); metrics are means over tasks.
  """
  def apply(state: MetaState, tasks: PyTree, key: jax.Array):
    keys = jax.random.split(key, _num_tasks(tasks))
    grads, metrics = jax.vmap(task_gradient, in_axes=(None, 0, 0))(
        state, tasks, keys)
    return update(state, _mean(grads)), _mean(metrics)
  return jax.jit(apply)


def make_evaluate(loss_fn: train.LossFn, adapt):
  """Jitted `evaluate(state, tasks, key)` -> per-task metrics [T].

  Each task's query set is scored before ('accuracy_before', 'loss_before')
  and after ('accuracy', 'loss') `adapt(state, support, key)`.
  """
  def evaluate_task(state: MetaState, task: PyTree, key: jax.Array):
    adapt_key, eval_key = jax.random.split(key)
    before = adaptation.batch_metrics(loss_fn, state.params, state.model_state,
                                      task['query'], eval_key)
    after = adaptation.batch_metrics(
        loss_fn, adapt(state, task['support'], adapt_key), state.model_state,
        task['query'], eval_key)
    return {'accuracy_before': before['accuracy'],
            'loss_before': before['loss'], 'accuracy': after['accuracy'],
            'loss': after['loss']}

  def evaluate(state: MetaState, tasks: PyTree, key: jax.Array):
    keys = jax.random.split(key, _num_tasks(tasks))
    return jax.vmap(evaluate_task, in_axes=(None, 0, 0))(state, tasks, keys)
  return jax.jit(evaluate)


def python_loop_apply(learner: MetaLearner):
  """The same outer step as `learner.apply`, as a Python loop over tasks.

  Each task's gradient is one call of a jitted `task_gradient`; the mean and
  the update run afterwards. It is the reference for tests and for the
  vmap-vs-loop speed benchmark, and uses the same keys as `apply`.
  """
  task_gradient = jax.jit(learner.task_gradient)
  update = jax.jit(learner.update)

  def apply(state: MetaState, tasks: PyTree, key: jax.Array):
    num = _num_tasks(tasks)
    keys = jax.random.split(key, num)
    outs = [task_gradient(state, jax.tree.map(lambda x, i=i: x[i], tasks),
                          keys[i]) for i in range(num)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    grads, metrics = _mean(stacked)
    return update(state, grads), metrics

  return apply
