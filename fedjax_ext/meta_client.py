"""Client updates for federated meta-learning: Per-FedAvg, federated Reptile.

`algorithms.per_fedavg` and `algorithms.fed_reptile` are FedOpt algorithms
whose clients run these meta-learning updates instead of plain local SGD,
so the server model is an initialisation that adapts well from a few of a
user's examples:

* Per-FedAvg (Fallah, Mokhtari & Ozdaglar 2020, "Personalized Federated
  Learning with Theoretical Guarantees: A Model-Agnostic Meta-Learning
  Approach"): every local step draws a support batch D and a disjoint query
  batch D' from the client's own data and takes
  w <- w - beta * grad_w f(w - alpha grad f(w, D), D'). `variant='first_order'`
  drops the Hessian term (their Per-FedAvg (FO)); `'hessian_free'` keeps
  (I - alpha H(w, D)) as a Hessian-vector product formed by automatic
  differentiation, so no Hessian is ever built (their Per-FedAvg (HF)
  estimates the same product by finite differences on a third batch; here
  the Hessian is taken on the support batch, as in MAML).
* Federated Reptile (Nichol et al. 2018 with clients as tasks; Jiang et al.
  2019, "Improving Federated Learning Personalization via Model Agnostic
  Meta Learning"): each client trains a copy of the server model for
  `local.num_steps` full-batch steps on a support and a query batch of its
  own, and the server moves towards the mean adapted model by
  `server_learning_rate` (Reptile's epsilon).

The inner loops and task gradients are few_shot's own (`few_shot.maml`,
`few_shot.reptile`): this module only turns one client's data into tasks
and a meta-learner's task gradient into a client update. beta is the client
optimiser (e.g. `optax.sgd(beta)`); trainable leaves follow
`local.trainable`, so bias-only or sparse meta-updates compose; int8 comes
with the loss function's model.

A client needs `2 * local.batch_size` real examples (a support and a
disjoint query batch); a client with fewer sends nothing (weight 0) and is
counted in the round's `num_empty_clients`. Models must carry no batch
statistics (norm 'group', 'layer' or 'none'): the algorithms' `init`
refuses batch norm.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fedjax_ext import client as client_lib
from few_shot import learner as learner_lib
from few_shot import maml
from few_shot import reptile
from ondevice import train

PyTree = Any
VARIANTS = ('first_order', 'hessian_free')


def support_query(data: Mapping[str, jax.Array], key: jax.Array,
                  size: int) -> tuple[dict[str, dict[str, jax.Array]],
                                      jax.Array]:
  """A task from one client's padded data: disjoint support and query.

  The client's real examples are put in a random order; the first `size`
  are the support batch and the next `size` the query batch.

  Returns:
    ({'support': batch, 'query': batch}, whether the client has the
    2 * size real examples the task needs).
  """
  valid = data['mask'] > 0
  # Real examples first, in random order; padding after them.
  order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, valid.shape),
                                2.0))

  def take(start):
    index = order[start:start + size]
    return {'x': data['x'][index], 'y': data['y'][index],
            'mask': valid[index].astype(jnp.float32)}

  return ({'support': take(0), 'query': take(size)},
          jnp.sum(valid) >= 2 * size)


def _meta_state(params, model_state) -> learner_lib.MetaState:
  """The view of a client's current model that a task gradient reads."""
  return learner_lib.MetaState(params=params, model_state=model_state,
                               opt_state=(), inner_lr={},
                               step=jnp.zeros((), jnp.int32))


def _client_metrics(per_step: Mapping[str, jax.Array], size: int,
                    enough: jax.Array) -> dict[str, jax.Array]:
  """Query loss and accuracy after adaptation, summed as rounds expect."""
  steps = per_step['loss'].shape[0]
  scale = jnp.where(enough, float(size), 0.0)
  return {'loss_sum': jnp.sum(per_step['loss']) * scale,
          'correct': jnp.sum(per_step['query_accuracy']) * scale,
          'count': scale * steps,
          'num_steps': jnp.where(enough, float(steps), 0.0)}


def meta_client_update(task_gradient, client_optimizer: optax.GradientTransformation,
                       local: client_lib.LocalConfig, num_tasks: int):
  """A client update that takes `num_tasks` meta-steps on its own tasks.

  Args:
    task_gradient: few_shot's `(MetaState, task, key) -> (grads, metrics)`
      with grads['params'] over the client's trainable leaves.
    client_optimizer: applied to each meta-gradient (Per-FedAvg's beta);
      fresh every round.
    local: batch size (of support and of query) and trainable leaves.
    num_tasks: meta-steps per round (static).

  Returns:
    `(params, model_state, data, key, context) -> ClientOutput`.
  """
  size = local.batch_size

  def client_update(params, model_state, data, key, context):
    del context
    paths = train.resolve_trainable(params, local.trainable)
    start, frozen = train.split_params(params, paths)

    def step(carry, step_key):
      trainable, opt_state = carry
      task_key, grad_key = jax.random.split(step_key)
      task, _ = support_query(data, task_key, size)
      state = _meta_state(train.merge_params(trainable, frozen), model_state)
      grads, metrics = task_gradient(state, task, grad_key)
      updates, opt_state = client_optimizer.update(grads['params'],
                                                   opt_state, trainable)
      return (optax.apply_updates(trainable, updates), opt_state), metrics

    (end, _), per_step = lax.scan(
        step, (start, client_optimizer.init(start)),
        jax.random.split(key, num_tasks))
    enough = jnp.sum(data['mask'] > 0) >= 2 * size
    weight = jnp.where(enough, jnp.sum(data['mask'] > 0), 0)
    return client_lib.ClientOutput(
        delta={k: end[k] - start[k] for k in paths},
        weight=weight.astype(jnp.float32),
        metrics=_client_metrics(per_step, size, enough),
        model_state=model_state, extras=None)

  return client_update


def per_fedavg_client(loss_fn: train.LossFn,
                      client_optimizer: optax.GradientTransformation,
                      local: client_lib.LocalConfig, *, alpha: float,
                      variant: str):
  """Per-FedAvg's client: `local.num_steps` MAML steps on its own tasks.

  Args:
    loss_fn: the clients' loss.
    client_optimizer: applied to each meta-gradient (beta).
    local: batch size of support and of query, meta-steps, trainable leaves.
    alpha: the inner (adaptation) learning rate.
    variant: 'first_order' or 'hessian_free' (module docstring).
  """
  if variant not in VARIANTS:
    raise ValueError(f'per_fedavg variant={variant!r} is unknown; choose one '
                     f'of {VARIANTS}.')
  if not alpha > 0:
    raise ValueError(f'per_fedavg alpha must be > 0; got {alpha}.')
  if not local.num_steps:
    raise ValueError('per_fedavg needs LocalConfig.num_steps (meta-steps per '
                     'round); epochs have no meaning for sampled tasks.')
  learner = maml.gradient_meta_learner(
      loss_fn, optax.identity(), inner_lr=alpha, inner_steps=1,
      first_order=variant == 'first_order', outer_trainable=local.trainable,
      name='per_fedavg')
  return meta_client_update(learner.task_gradient, client_optimizer, local,
                            local.num_steps)


def fed_reptile_client(loss_fn: train.LossFn,
                       client_optimizer: optax.GradientTransformation,
                       local: client_lib.LocalConfig):
  """Federated Reptile's client: one Reptile task a round.

  It trains for `local.num_steps` full-batch steps of `client_optimizer` on
  its support and query batches together and sends the adapted delta.
  """
  if not local.num_steps:
    raise ValueError('fed_reptile needs LocalConfig.num_steps (inner steps '
                     'of the client task).')
  learner = reptile.reptile(loss_fn, optax.identity(),
                            inner_optimizer=client_optimizer,
                            inner_steps=local.num_steps,
                            trainable=local.trainable)
  # Reptile's pseudo-gradient is phi - W: one SGD step of rate 1 on it lands
  # on W, so the client sends W - phi.
  return meta_client_update(learner.task_gradient, optax.sgd(1.0), local,
                            num_tasks=1)
