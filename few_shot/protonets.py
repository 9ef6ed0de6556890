"""Prototypical Networks as an `(init, apply)` factory.

Snell, Swersky & Zemel (2017), "Prototypical Networks for Few-shot
Learning": embed the support set, average each class's embeddings into a
prototype c_k, and classify a query f(x) by a softmax over the negative
squared Euclidean distances -||f(x) - c_k||^2. Meta-training minimises the
query cross-entropy of that softmax over episodes.

The embedding is the model's `features(x)` (the classifier's input), so a
ProtoNet meta-trains the same backbone the other learners do. Adapting to a
task needs no gradient step: as Snell et al. note (section 2.4), the
classifier is linear in f(x),

    -||f - c_k||^2 = 2 c_k . f - ||c_k||^2 - ||f||^2,

and the last term is the same for every class, so `adapt` writes W = 2 C^T
and b_k = -||c_k||^2 into the model's 'classifier' Dense, which gives the
same softmax. Classes absent from the support set get a bias of
`ABSENT_LOGIT`, so they are never predicted. Personalisation and
evaluation then use the model like any other adapted parameter tree.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from few_shot import learner as learner_lib
from ondevice import train

Trainable = Sequence[str] | Callable[[str], bool] | None
ABSENT_LOGIT = -1e9


def features_fn(model: nn.Module):
  """`(params, model_state, x, rng) -> [B, D]` from `model.features`."""
  if not hasattr(model, 'features'):
    raise ValueError(f'{type(model).__name__} has no `features` method; '
                     'ProtoNets embed with it (see ondevice.models).')

  def embed(params, model_state, x, rng):
    rngs = None
    if rng is not None:
      dropout_rng, quant_rng = jax.random.split(rng)
      rngs = {'dropout': dropout_rng, 'quant': quant_rng}
    return model.apply({'params': params, **model_state}, x, train=True,
                       rngs=rngs, method=model.features)
  return embed


def prototypes(embeddings: jax.Array, labels: jax.Array, mask: jax.Array,
               num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Class means of the masked support embeddings.

  Returns:
    (prototypes [num_classes, D], support count per class [num_classes]);
    a class without support has a zero prototype and count 0.
  """
  onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
  counts = jnp.sum(onehot, axis=0)
  sums = onehot.T @ embeddings
  return sums / jnp.maximum(counts, 1.0)[:, None], counts


def prototype_logits(query: jax.Array, protos: jax.Array,
                     counts: jax.Array) -> jax.Array:
  """-||q - c_k||^2 for every query and class; ABSENT_LOGIT without support."""
  d2 = jnp.sum(jnp.square(query[:, None, :] - protos[None, :, :]), axis=-1)
  return jnp.where(counts[None, :] > 0, -d2, ABSENT_LOGIT)


def protonet(model: nn.Module, outer_optimizer: optax.GradientTransformation,
             *, num_classes: int, trainable: Trainable = None,
             loss_fn: train.LossFn | None = None,
             head: str = 'classifier') -> learner_lib.MetaLearner:
  """Builds a ProtoNet over `model`'s features.

  Args:
    model: a flax model with `features(x, train)` and a Dense head `head`.
    outer_optimizer: optax transformation of the trainable params.
    num_classes: label space of the tasks (n_way for keyword tasks, the
      model's classes for speaker tasks); static.
    trainable: leaves meta-trained (None: all; the head gets no gradient).
    loss_fn: loss used by `evaluate` on the adapted model (default
      `classification_loss(model)`).
    head: name of the classifier Dense that `adapt` overwrites.
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int; got '
                     f'{num_classes!r}.')
  embed = features_fn(model)
  eval_loss = loss_fn or train.classification_loss(model)

  def paths_of(params):
    return learner_lib.resolve_paths(params, trainable, 'protonet: trainable')

  def init(params, model_state=None) -> learner_lib.MetaState:
    return learner_lib.init_state(params, model_state, outer_optimizer,
                                  paths_of(params), {}, 'protonet')

  task_gradient = _task_gradient(embed, paths_of, num_classes)
  adapt = _adapt(embed, num_classes, head)
  update = learner_lib.make_update(outer_optimizer, paths_of)
  return learner_lib.MetaLearner(
      init=init, apply=learner_lib.make_apply(task_gradient, update),
      evaluate=learner_lib.make_evaluate(eval_loss, adapt),
      task_gradient=task_gradient, update=update, adapt=adapt)


def _task_gradient(embed, paths_of, num_classes: int):
  """One episode's gradient: the query cross-entropy of the softmax over
  negative squared distances to the support prototypes."""

  def task_gradient(state, task, key):
    trainable_params, frozen = train.split_params(state.params,
                                                  paths_of(state.params))
    support, query = task['support'], task['query']
    support_key, query_key = jax.random.split(key)

    def query_loss(meta):
      params = train.merge_params(meta['params'], frozen)
      protos, counts = prototypes(
          embed(params, state.model_state, support['x'], support_key),
          support['y'], support['mask'], num_classes)
      logits = prototype_logits(
          embed(params, state.model_state, query['x'], query_key), protos,
          counts)
      sums = train.classification_metrics(logits, query['y'], query['mask'])
      count = jnp.maximum(sums['count'], 1.0)
      return sums['loss_sum'] / count, {
          'loss': sums['loss_sum'] / count,
          'query_accuracy': sums['correct'] / count}

    meta = {'params': trainable_params, 'inner_lr': {}}
    (_, metrics), grads = jax.value_and_grad(query_loss, has_aux=True)(meta)
    return grads, metrics
  return task_gradient


def _adapt(embed, num_classes: int, head: str):
  """`adapt(state, support, key)`: the prototypes written into the head
  (W = 2 C^T, b_k = -||c_k||^2; see the module docstring)."""

  def adapt(state, support, key):
    protos, counts = prototypes(
        embed(state.params, state.model_state, support['x'], key),
        support['y'], support['mask'], num_classes)
    flat = train.flatten_params(state.params)
    kernel, bias = f'{head}/kernel', f'{head}/bias'
    if kernel not in flat or bias not in flat:
      raise ValueError(f'protonet: the model has no Dense head {head!r} '
                       f'(paths {sorted(flat)}); pass head=.')
    if flat[kernel].shape != (protos.shape[1], num_classes):
      raise ValueError(
          f'protonet: head {head!r} has kernel shape {flat[kernel].shape}, '
          f'but prototypes need ({protos.shape[1]}, {num_classes}); build the '
          'model with num_classes equal to the tasks\' label space.')
    flat[kernel] = 2.0 * protos.T
    flat[bias] = jnp.where(counts > 0, -jnp.sum(jnp.square(protos), axis=-1),
                           ABSENT_LOGIT)
    return train.unflatten_params(flat)
  return adapt
