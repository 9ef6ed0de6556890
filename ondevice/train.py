"""The pure training step every research area builds on.

A step is `(state, batch, rng) -> (state, metrics)`: no hidden state, jittable,
and vmappable over a leading client axis. Techniques compose by wrapping the
pieces built here:

* a loss function `(params, model_state, batch, rng) -> (loss, aux)`, e.g.
  `classification_loss(model)`, which continual-learning regularisers wrap;
* `make_train_step(loss_fn, optimizer, trainable=...)`, where `trainable`
  names the parameters that train. Only those are differentiated, so the
  gradient of a frozen weight is never computed or stored, and the optimiser
  state exists only for trainable leaves.

Batches are dicts with 'x' (inputs), 'y' (int labels) and 'mask' (1.0 for a
real example, 0.0 for padding). Padded examples contribute nothing to the loss,
the gradient or the metrics.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, model_state, batch, rng) -> (scalar loss, (metric sums, new model_state))
LossFn = Callable[[PyTree, PyTree, Batch, jax.Array],
                  tuple[jax.Array, tuple[Metrics, PyTree]]]


class TrainState(NamedTuple):
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, number of steps taken.
    params: the model's full parameter tree (trainable and frozen).
    opt_state: optimiser state over the trainable leaves only.
    model_state: non-parameter variable collections (e.g. 'batch_stats');
      an empty dict for models without any.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  model_state: PyTree


def flatten_params(params: PyTree) -> dict[str, jax.Array]:
  """{'pw1': {'kernel': w}} -> {'pw1/kernel': w}: the paths rules match on."""
  return traverse_util.flatten_dict(params, sep='/')


def unflatten_params(flat: Mapping[str, jax.Array]) -> PyTree:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def resolve_trainable(params: PyTree,
                      trainable: Sequence[str] | Callable[[str], bool] | None
                      ) -> tuple[str, ...]:
  """Returns the sorted paths of the trainable leaves.

  Args:
    params: parameter tree.
    trainable: None (everything trains), a sequence of paths, or a predicate
      on a path such as 'classifier/bias'.
  """
  paths = sorted(flatten_params(params))
  if trainable is None:
    return tuple(paths)
  if callable(trainable):
    return tuple(p for p in paths if trainable(p))
  unknown = sorted(set(trainable) - set(paths))
  if unknown:
    raise ValueError(f'Trainable paths {unknown} are not parameters of the '
                     f'model; valid paths are {paths}.')
  return tuple(p for p in paths if p in set(trainable))


def split_params(params: PyTree, trainable_paths: Sequence[str]
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Splits params into flat (trainable, frozen) dicts keyed by path."""
  flat = flatten_params(params)
  keep = set(trainable_paths)
  return ({k: v for k, v in flat.items() if k in keep},
          {k: v for k, v in flat.items() if k not in keep})


def merge_params(trainable: Mapping[str, jax.Array],
                 frozen: Mapping[str, jax.Array]) -> PyTree:
  return unflatten_params({**frozen, **trainable})


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over the examples where mask is 1 (0 if none are)."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def classification_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array) -> Metrics:
  """Sums (not means) so that they add up across batches and clients."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  return {'loss_sum': jnp.sum(per_example * mask),
          'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def summarize(sums: Mapping[str, jax.Array]) -> dict[str, float]:
  """Turns summed metrics into means: loss and accuracy per real example."""
  count = max(float(sums['count']), 1.0)
  out = {'loss': float(sums['loss_sum']) / count,
         'accuracy': float(sums['correct']) / count,
         'count': float(sums['count'])}
  for key, value in sums.items():
    if key not in ('loss_sum', 'correct', 'count'):
      out[key] = float(value)
  return out


def _apply(model: nn.Module, params, model_state, x, *, train: bool,
           rng: jax.Array | None, mask: jax.Array | None):
  """Applies `model`; returns (logits, new model_state)."""
  variables = {'params': params, **model_state}
  kwargs = {}
  if mask is not None and getattr(model, 'accepts_mask', False):
    kwargs['mask'] = mask
  # A stock module whose __call__ has no `train` argument is called without
  # it (it then has no train-only behaviour such as dropout).
  params_of_call = inspect.signature(model.__call__).parameters
  takes_train = 'train' in params_of_call or any(
      p.kind == p.VAR_KEYWORD for p in params_of_call.values())
  if takes_train:
    kwargs['train'] = train
  rngs = None
  if rng is not None:
    dropout_rng, quant_rng = jax.random.split(rng)
    rngs = {'dropout': dropout_rng, 'quant': quant_rng}
  if train and model_state:
    logits, new_state = model.apply(variables, x, rngs=rngs,
                                    mutable=list(model_state), **kwargs)
    return logits, dict(new_state)
  logits = model.apply(variables, x, rngs=rngs, **kwargs)
  return logits, model_state


def classification_loss(model: nn.Module, label_smoothing: float = 0.0
                        ) -> LossFn:
  """Masked softmax cross-entropy of `model`'s logits.

  Args:
    model: a flax module called as `model.apply(variables, x, train=...)`.
    label_smoothing: mass spread uniformly over the classes (Szegedy 2016).

  Returns:
    A `LossFn` whose aux is (summed metrics, new model_state).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must lie in [0, 1); got '
                     f'{label_smoothing}.')

  def loss_fn(params, model_state, batch, rng):
    mask = batch['mask']
    logits, new_state = _apply(model, params, model_state, batch['x'],
                               train=True, rng=rng, mask=mask)
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(
        jax.nn.one_hot(batch['y'], num_classes), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    loss = masked_mean(per_example, mask)
    return loss, (classification_metrics(logits, batch['y'], mask), new_state)

  return loss_fn


def init_state(model: nn.Module, optimizer: optax.GradientTransformation,
               example_x: jax.Array, rng: jax.Array,
               trainable: Sequence[str] | Callable[[str], bool] | None = None
               ) -> TrainState:
  """Initialises params, model state and the optimiser state.

  Args:
    model: flax module.
    optimizer: optax transformation over the trainable leaves.
    example_x: a batch of inputs with the right shape (values unused).
    rng: PRNG key for the initialisation.
    trainable: see `resolve_trainable`.
  """
  params_rng, dropout_rng, quant_rng = jax.random.split(rng, 3)
  variables = model.init(
      {'params': params_rng, 'dropout': dropout_rng, 'quant': quant_rng},
      example_x, train=False)
  variables = dict(variables)
  params = variables.pop('params')
  return state_from_params(params, variables, optimizer, trainable)


def state_from_params(params: PyTree, model_state: PyTree,
                      optimizer: optax.GradientTransformation,
                      trainable: Sequence[str] | Callable[[str], bool] | None
                      = None) -> TrainState:
  """A fresh TrainState (step 0) around given params (e.g. pre-trained)."""
  paths = resolve_trainable(params, trainable)
  if not paths:
    raise ValueError('No parameter is trainable: the trainable rules froze '
                     'every leaf.')
  train_params, _ = split_params(params, paths)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(train_params),
                    model_state=dict(model_state))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    trainable: Sequence[str] | None = None):
  """Builds `step(state, batch, rng) -> (state, metrics)`.

  Args:
    loss_fn: see `LossFn`.
    optimizer: optax transformation; its state covers only trainable leaves.
    trainable: paths of the trainable leaves (from `resolve_trainable`), or
      None for all. Frozen leaves are closed over as constants of the
      differentiation, so their gradients are never formed.

  Returns:
    The pure step. A batch whose mask is all zero leaves params unchanged
    (the gradient is zero, and we also skip the optimiser update so that
    momentum does not move the params).
  """
  def step(state: TrainState, batch: Batch, rng: jax.Array):
    paths = (tuple(sorted(flatten_params(state.params)))
             if trainable is None else tuple(trainable))
    train_params, frozen = split_params(state.params, paths)

    def loss_of_trainable(tp):
      return loss_fn(merge_params(tp, frozen), state.model_state, batch, rng)

    (loss, (sums, new_model_state)), grads = jax.value_and_grad(
        loss_of_trainable, has_aux=True)(train_params)
    updates, new_opt_state = optimizer.update(grads, state.opt_state,
                                              train_params)
    new_train = optax.apply_updates(train_params, updates)
    # An all-padding batch (e.g. a client with fewer steps than the cohort's
    # maximum) must be a no-op for params, optimiser and model state.
    has_data = sums['count'] > 0
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(has_data, n, o), new, old)
    new_state = TrainState(
        step=state.step + has_data.astype(jnp.int32),
        params=merge_params(keep(new_train, train_params), frozen),
        opt_state=keep(new_opt_state, state.opt_state),
        model_state=keep(new_model_state, state.model_state))
    metrics = dict(sums)
    metrics['loss'] = loss
    metrics['grad_norm'] = optax.tree.norm(grads)
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module):
  """Builds `eval_step(params, model_state, batch) -> summed metrics`."""
  def eval_step(params, model_state, batch):
    logits, _ = _apply(model, params, model_state, batch['x'], train=False,
                       rng=None, mask=batch['mask'])
    return classification_metrics(logits, batch['y'], batch['mask'])
  return eval_step


def pad_batch(x, y, batch_size: int) -> dict[str, Any]:
  """Pads a final short batch to `batch_size` with masked-out examples."""
  import numpy as np  # Host-side batching only.
  n = len(x)
  if n > batch_size:
    raise ValueError(f'pad_batch got {n} examples for batch size '
                     f'{batch_size}.')
  pad = batch_size - n
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  if pad:
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((pad,), y.dtype)])
  return {'x': x, 'y': y, 'mask': mask}


def evaluate(eval_step, params, model_state, x, y, batch_size: int
             ) -> dict[str, float]:
  """Loss and accuracy over all of (x, y), padding the last batch.

  `eval_step` should be jitted by the caller so that it compiles once.
  """
  totals = None
  for start in range(0, len(x), batch_size):
    batch = pad_batch(x[start:start + batch_size], y[start:start + batch_size],
                      batch_size)
    sums = eval_step(params, model_state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('evaluate() got an empty dataset.')
  return summarize(totals)
