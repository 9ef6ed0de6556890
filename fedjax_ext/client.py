"""The pure client update of federated learning: local steps from the server.

`client_update(server_params, model_state, client_data, key)` runs local
training on one client's padded examples with `lax.scan` over the foundation's
train step (`ondevice.train.make_train_step`) and returns the model delta, the
client's weight and summed metrics. It is the `ClientUpdate` of FedAvg
(McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") and is written so that one `jax.vmap` runs a cohort.

Local batches are drawn on device. In epoch e a client visits its n valid
examples in the order of a fresh permutation (keyed by `fold_in(key, e)`), in
ceil(n / B) batches of B; the last batch of an epoch is short and padded with
mask 0 (it never crosses into the next epoch). The scan has a fixed length:

* `num_steps=S`: S steps; a client cycles through its epochs until S steps
  are done (like FedJAX's `shuffle_repeat_batch(num_steps=S)`).
* `num_epochs=E`: E * ceil(M / B) steps, enough for the largest possible
  client; a smaller client finishes its E epochs early and its remaining
  steps have all-zero masks. Such steps are skipped with `lax.cond` when
  the client runs on its own (streamed execution), and are no-ops of the
  train step under a vmap, where the cond becomes a select.
* both: whichever ends first.

A client with no valid example (a padded cohort slot) takes no step and has
weight 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import optax

from ondevice import train

PyTree = Any
FlatParams = dict[str, jax.Array]
# (loss_fn, server trainable params (flat), context) -> loss_fn. `context` is
# the per-client PyTree given to client_update (SCAFFOLD's correction).
LossWrapper = Callable[[train.LossFn, FlatParams, PyTree], train.LossFn]


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """How much a client trains per round.

  Attributes:
    batch_size: B, examples per local step.
    num_steps: S local steps, or None.
    num_epochs: E passes over the client's data, or None. At least one of
      num_steps / num_epochs must be set.
    trainable: which params train (paths, a predicate on paths, or None for
      all); frozen leaves get no gradient and no delta (sparse / bias-only
      updates plug in here).
  """
  batch_size: int
  num_steps: int | None = None
  num_epochs: int | None = None
  trainable: Sequence[str] | Callable[[str], bool] | None = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f'LocalConfig.batch_size must be >= 1; got '
                       f'{self.batch_size}.')
    if self.num_steps is None and self.num_epochs is None:
      raise ValueError('LocalConfig needs num_steps or num_epochs (or both); '
                       'set e.g. num_steps=4.')
    for name in ('num_steps', 'num_epochs'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f'LocalConfig.{name} must be >= 1 or None; got '
                         f'{value}.')

  def scan_length(self, max_examples: int) -> int:
    """Number of scanned steps for a cohort padded to `max_examples`."""
    lengths = []
    if self.num_steps is not None:
      lengths.append(self.num_steps)
    if self.num_epochs is not None:
      lengths.append(self.num_epochs * -(-max_examples // self.batch_size))
    return min(lengths)


class ClientOutput(NamedTuple):
  """What one client sends back (before any transform or aggregation).

  Attributes:
    delta: flat dict path -> (trainable param after - before local training).
    weight: float32 number of real examples of the client.
    metrics: summed training metrics ('loss_sum', 'correct', 'count', ...)
      over the local steps, and 'num_steps', the real (non-padded) steps.
    model_state: the client's model state after training (e.g. batch_stats;
      {} for models without one).
    extras: anything else an algorithm's client sends (SCAFFOLD: its control
      variate update); None by default.
  """
  delta: FlatParams
  weight: jax.Array
  metrics: dict[str, jax.Array]
  model_state: PyTree
  extras: PyTree = None


def local_batch(client_data: Mapping[str, jax.Array], key: jax.Array,
                step: jax.Array, batch_size: int,
                num_epochs: int | None) -> dict[str, jax.Array]:
  """The `step`-th local batch of one client (see the module docstring)."""
  valid = client_data['mask'] > 0
  max_examples = valid.shape[0]
  n = jnp.sum(valid).astype(jnp.int32)
  steps_per_epoch = jnp.maximum((n + batch_size - 1) // batch_size, 1)
  epoch = step // steps_per_epoch
  start = (step % steps_per_epoch) * batch_size
  # Valid examples first, in a random order that changes every epoch.
  scores = jnp.where(valid,
                     jax.random.uniform(jax.random.fold_in(key, epoch),
                                        (max_examples,)), 2.0)
  order = jnp.argsort(scores)
  padded = -(-max_examples // batch_size) * batch_size
  order = jnp.pad(order, (0, padded - max_examples))
  index = lax.dynamic_slice(order, (start,), (batch_size,))
  real = start + jnp.arange(batch_size) < n
  if num_epochs is not None:
    real &= epoch < num_epochs
  return {'x': jnp.take(client_data['x'], index, axis=0),
          'y': jnp.take(client_data['y'], index, axis=0),
          'mask': real.astype(jnp.float32)}


def make_client_update(loss_fn: train.LossFn,
                       optimizer: optax.GradientTransformation,
                       local: LocalConfig,
                       loss_wrapper: LossWrapper | None = None):
  """Builds the pure `client_update`.

  Args:
    loss_fn: `(params, model_state, batch, rng) -> (loss, (sums, state))`,
      e.g. `ondevice.train.classification_loss(model)`, possibly wrapped by a
      regulariser or built on a quantised model.
    optimizer: the local (client) optimiser; its state starts fresh every
      round.
    local: steps / epochs / batch size / trainable params.
    loss_wrapper: optional `(loss_fn, server_trainable, context) -> loss_fn`
      applied every round, e.g. FedProx's proximal term.

  Returns:
    `client_update(server_params, model_state, client_data, key,
    context=None) -> ClientOutput`, where client_data is one client's
    {'x': [M, ...], 'y': [M], 'mask': [M]}. Pure, jittable and vmappable.
  """
  def client_update(server_params: PyTree, model_state: PyTree,
                    client_data: Mapping[str, jax.Array], key: jax.Array,
                    context: PyTree = None) -> ClientOutput:
    paths = train.resolve_trainable(server_params, local.trainable)
    if not paths:
      raise ValueError('LocalConfig.trainable froze every parameter; nothing '
                       'would be sent to the server.')
    server_trainable, _ = train.split_params(server_params, paths)
    client_loss = loss_fn
    if loss_wrapper is not None:
      client_loss = loss_wrapper(loss_fn, server_trainable, context)
    step_fn = train.make_train_step(client_loss, optimizer, paths)
    state = train.state_from_params(server_params, model_state, optimizer,
                                    paths)
    batch_key, step_key = jax.random.split(key)
    max_examples = client_data['mask'].shape[0]

    def train_step(state, batch, step):
      state, metrics = step_fn(state, batch,
                               jax.random.fold_in(step_key, step))
      # 'loss' and 'grad_norm' are per-step means, not sums: dropped here.
      return state, {k: v for k, v in metrics.items()
                     if k not in ('loss', 'grad_norm')}

    def skip_step(state, batch, step):
      # An all-padding batch: the train step would leave the state as it is
      # and sum zeros; skipping it saves the work when the client update
      # runs unbatched (streamed execution). Under vmap, lax.cond becomes a
      # select and both branches run, as before.
      sums = jax.eval_shape(train_step, state, batch, step)[1]
      return state, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums)

    def body(state, step):
      batch = local_batch(client_data, batch_key, step, local.batch_size,
                          local.num_epochs)
      return lax.cond(jnp.any(batch['mask'] > 0), train_step, skip_step,
                      state, batch, step)

    steps = jnp.arange(local.scan_length(max_examples))
    final, per_step = lax.scan(body, state, steps)
    metrics = {k: jnp.sum(v, axis=0) for k, v in per_step.items()}
    metrics['num_steps'] = jnp.sum(per_step['count'] > 0).astype(jnp.float32)
    final_trainable, _ = train.split_params(final.params, paths)
    delta = {k: final_trainable[k] - server_trainable[k] for k in paths}
    weight = jnp.sum(client_data['mask'] > 0).astype(jnp.float32)
    return ClientOutput(delta=delta, weight=weight, metrics=metrics,
                        model_state=final.model_state)

  return client_update


def proximal_wrapper(mu: float) -> LossWrapper:
  """FedProx's term mu/2 ||w - w_server||^2 over the trainable leaves.

  Li et al. 2020, "Federated Optimization in Heterogeneous Networks".
  """
  if mu < 0:
    raise ValueError(f'FedProx mu must be >= 0; got {mu}.')

  def wrap(loss_fn, server_trainable, context):
    del context

    def prox_loss(params, model_state, batch, rng):
      loss, aux = loss_fn(params, model_state, batch, rng)
      flat = train.flatten_params(params)
      sq = sum(jnp.sum(jnp.square(flat[k] - lax.stop_gradient(w)))
               for k, w in server_trainable.items())
      return loss + 0.5 * mu * sq, aux

    return prox_loss

  return wrap


def control_variate_wrapper() -> LossWrapper:
  """SCAFFOLD's corrected gradient g - c_i + c as a loss term.

  Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
  Federated Learning". Adding <w, c - c_i> to the loss (with c - c_i held
  constant) adds exactly c - c_i to the gradient. `context` is the flat dict
  path -> (c - c_i) over the trainable leaves.
  """
  def wrap(loss_fn, server_trainable, correction):
    del server_trainable

    def corrected_loss(params, model_state, batch, rng):
      loss, aux = loss_fn(params, model_state, batch, rng)
      flat = train.flatten_params(params)
      linear = sum(jnp.sum(flat[k] * lax.stop_gradient(c))
                   for k, c in correction.items())
      return loss + linear, aux

    return corrected_loss

  return wrap
