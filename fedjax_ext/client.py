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

`LocalConfig.last_batch='fill'` draws batches as FedJAX's
`shuffle_repeat_batch` does instead: the client's epochs form one stream of
permutations, step s takes stream positions [s * B, (s + 1) * B), so a short
last batch of an epoch is filled with the first examples of the next epoch's
permutation and every batch holds B real examples. With `num_epochs=E` a
client takes ceil(n * E / B) steps.

How the local steps are looped (`LocalConfig.loop`) does not change what is
computed, only how XLA compiles it: 'scan' is one `lax.scan` (one compiled
step, reused; all-padding steps are skipped by a `lax.cond`), 'unroll' is
the same scan with `unroll=True` and no cond (every step inlined, so XLA
compiles each one as top-level code; a padded step runs and changes
nothing). XLA:CPU runs a convolution inside a loop or a conditional much
more slowly than an inlined one. So on a CPU, `LocalConfig.conv='auto'`
first rewrites a model's XLA convolutions into the library's im2col and
shifted-sum forms (`with_cpu_convolutions`), which run as fast in a scan;
with `conv='native'`, 'auto' unrolls steps that still hold a convolution
(`resolve_loop`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import optax

from fedjax_ext import execution
from fedjax_ext import fedjax_interop
from ondevice import train
from ondevice.models import layers

PyTree = Any
FlatParams = dict[str, jax.Array]
# (loss_fn, server trainable params (flat), context) -> loss_fn. `context` is
# the per-client PyTree given to client_update (SCAFFOLD's correction).
LossWrapper = Callable[[train.LossFn, FlatParams, PyTree], train.LossFn]
LOOPS = ('auto', 'scan', 'unroll')
CONVS = ('auto', 'native', 'im2col')
LAST_BATCHES = ('mask', 'fill')
# What `with_cpu_convolutions` rewrites (max pools only when their windows
# tile the input; other pools and convolutions are left as lax's).
REWRITTEN_PRIMITIVES = execution.CONV_PRIMITIVES | {'reduce_window_max'}
# 'auto' unrolls at most this many local steps: compile time and program size
# grow linearly with the unrolled length.
AUTO_UNROLL_MAX_STEPS = 64


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
    loop: how the local steps are looped, one of LOOPS: 'scan', 'unroll'
      or 'auto' (the rule of `resolve_loop`). Results are the same.
    last_batch: 'mask' pads the short last batch of an epoch with masked
      examples; 'fill' fills it from the next epoch's permutation, as
      FedJAX's `shuffle_repeat_batch` does (module docstring).
    conv: how the XLA convolutions of a model the library did not write
      (stock `nn.Conv`, `hk.Conv2D`) run: 'native' as written, 'im2col'
      rewritten into the library's matmul forms
      (`ondevice.models.layers.cpu_friendly_conv_general_dilated`, same
      results up to float rounding), 'auto' im2col on a CPU backend, native
      elsewhere (see `with_cpu_convolutions`; 'im2col' also rewrites max
      pools whose windows tile the input, bit for bit).
  """
  batch_size: int
  num_steps: int | None = None
  num_epochs: int | None = None
  trainable: Sequence[str] | Callable[[str], bool] | None = None
  loop: str = 'auto'
  last_batch: str = 'mask'
  conv: str = 'auto'

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
    if self.loop not in LOOPS:
      raise ValueError(f'LocalConfig.loop must be one of {LOOPS}; got '
                       f'{self.loop!r}.')
    if self.conv not in CONVS:
      raise ValueError(f'LocalConfig.conv must be one of {CONVS}; got '
                       f'{self.conv!r}.')
    if self.last_batch not in LAST_BATCHES:
      raise ValueError(f'LocalConfig.last_batch must be one of '
                       f'{LAST_BATCHES}; got {self.last_batch!r}.')

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


def _epoch_order(key: jax.Array, epoch: jax.Array,
                 valid: jax.Array) -> jax.Array:
  """Valid examples first, in a random order that changes every epoch."""
  scores = jnp.where(valid,
                     jax.random.uniform(jax.random.fold_in(key, epoch),
                                        valid.shape), 2.0)
  return jnp.argsort(scores)


def _gather(client_data, index, real):
  return {'x': jnp.take(client_data['x'], index, axis=0),
          'y': jnp.take(client_data['y'], index, axis=0),
          'mask': real.astype(jnp.float32)}


def _filled_positions(client_data, step: jax.Array, batch_size: int):
  """(n, epoch, offset) of each position of step `step`'s batch."""
  n = jnp.sum(client_data['mask'] > 0).astype(jnp.int32)
  positions = step * batch_size + jnp.arange(batch_size)
  return n, positions // jnp.maximum(n, 1), positions % jnp.maximum(n, 1)


def _per_position_index(key, valid, epochs, offsets) -> jax.Array:
  # A batch may span several epochs (n < B): one permutation per position.
  return jax.vmap(lambda e, o: _epoch_order(key, e, valid)[o])(epochs,
                                                               offsets)


def _filled_gather(client_data, index, n, step, batch_size: int,
                   num_epochs: int | None) -> dict[str, jax.Array]:
  real = jnp.broadcast_to(n > 0, (batch_size,))
  if num_epochs is not None:
    real &= step < (n * num_epochs + batch_size - 1) // batch_size
  return _gather(client_data, index, real)


def _filled_batch(client_data: Mapping[str, jax.Array], key: jax.Array,
                  step: jax.Array, batch_size: int,
                  num_epochs: int | None) -> dict[str, jax.Array]:
  """FedJAX-style batch: positions of one stream of epoch permutations."""
  n, epochs, offsets = _filled_positions(client_data, step, batch_size)
  index = _per_position_index(key, client_data['mask'] > 0, epochs, offsets)
  return _filled_gather(client_data, index, n, step, batch_size, num_epochs)


def _cached_filled_batch(client_data, key, step, batch_size: int,
                         num_epochs: int | None, cache):
  """`_filled_batch` and the cache after it, drawing each epoch's order
  once: a batch of n >= B real examples spans at most two epochs, whose
  orders are the kept one or a new draw."""
  valid = client_data['mask'] > 0
  n, epochs, offsets = _filled_positions(client_data, step, batch_size)
  first = epochs[0]
  cached_epoch, cached_order = cache
  low = lax.cond(first == cached_epoch, lambda: cached_order,
                 lambda: _epoch_order(key, first, valid))
  spans = epochs[-1] != first
  high = lax.cond(spans, lambda: _epoch_order(key, first + 1, valid),
                  lambda: low)
  index = jnp.where(epochs == first, low[offsets], high[offsets])
  index = lax.cond(epochs[-1] - first > 1,
                   lambda: _per_position_index(key, valid, epochs, offsets),
                   lambda: index)
  batch = _filled_gather(client_data, index, n, step, batch_size, num_epochs)
  return batch, (first + spans.astype(first.dtype), high)


def local_batch(client_data: Mapping[str, jax.Array], key: jax.Array,
                step: jax.Array, batch_size: int,
                num_epochs: int | None,
                last_batch: str = 'mask') -> dict[str, jax.Array]:
  """The `step`-th local batch of one client (see the module docstring)."""
  if last_batch == 'fill':
    return _filled_batch(client_data, key, step, batch_size, num_epochs)
  position = _epoch_position(client_data, step, batch_size)
  order = _epoch_order(key, position[1], client_data['mask'] > 0)
  return _masked_batch(client_data, order, position, batch_size, num_epochs)


def _epoch_position(client_data, step: jax.Array, batch_size: int):
  """(n, epoch, first example of the batch in the epoch's order) of local
  step `step` ('mask' batching: ceil(n / B) steps per epoch)."""
  n = jnp.sum(client_data['mask'] > 0).astype(jnp.int32)
  steps_per_epoch = jnp.maximum((n + batch_size - 1) // batch_size, 1)
  return (n, step // steps_per_epoch,
          (step % steps_per_epoch) * batch_size)


def _masked_batch(client_data, order: jax.Array, position, batch_size: int,
                  num_epochs: int | None) -> dict[str, jax.Array]:
  """The batch at `position` (`_epoch_position`), given its epoch's order."""
  n, epoch, start = position
  max_examples = client_data['mask'].shape[0]
  padded = -(-max_examples // batch_size) * batch_size
  order = jnp.pad(order, (0, padded - max_examples))
  index = lax.dynamic_slice(order, (start,), (batch_size,))
  real = start + jnp.arange(batch_size) < n
  if num_epochs is not None:
    real &= epoch < num_epochs
  return _gather(client_data, index, real)


def _non_overlapping(params) -> bool:
  """A reduce-window whose windows tile the input: max pooling with stride
  equal to the window and VALID padding, as `nn.max_pool(x, (2, 2),
  (2, 2))` and `hk.max_pool(..., padding='VALID')` emit."""
  ones = lambda dims: all(d == 1 for d in dims)
  return (tuple(params['window_dimensions']) ==
          tuple(params['window_strides']) and
          all(tuple(pad) == (0, 0) for pad in params['padding']) and
          ones(params['base_dilation']) and ones(params['window_dilation']))


def _eval_rewriting_convs(jaxpr, consts, *args):
  """Evaluates a jaxpr with each convolution and non-overlapping max pool
  in its CPU-friendly form."""
  env = {}
  read = lambda v: v.val if hasattr(v, 'val') else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    p = eqn.params
    if eqn.primitive.name == 'conv_general_dilated' and (
        p['batch_group_count'] == 1):
      outs = [layers.cpu_friendly_conv_general_dilated(
          invals[0], invals[1], p['window_strides'], p['padding'],
          lhs_dilation=p['lhs_dilation'], rhs_dilation=p['rhs_dilation'],
          dimension_numbers=p['dimension_numbers'],
          feature_group_count=p['feature_group_count'],
          precision=p['precision'],
          preferred_element_type=p['preferred_element_type'])]
    elif eqn.primitive.name == 'reduce_window_max' and _non_overlapping(p):
      outs = [layers.windowed_max(invals[0], p['window_dimensions'])]
    elif eqn.primitive.name in ('pjit', 'jit'):
      outs = _eval_rewriting_convs(p['jaxpr'].jaxpr, p['jaxpr'].consts,
                                   *invals)
    else:
      bind_params = eqn.primitive.get_bind_params(p)
      subfuns = ()
      if isinstance(bind_params, tuple):  # Older JAX: (subfuns, params).
        subfuns, bind_params = bind_params
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def with_cpu_convolutions(loss_fn: train.LossFn) -> train.LossFn:
  """`loss_fn` with its XLA convolutions in the library's CPU forms.

  Traces `loss_fn` to a jaxpr and evaluates it with every
  `conv_general_dilated` (also inside a `jit`) replaced by
  `ondevice.models.layers.cpu_friendly_conv_general_dilated`: im2col
  matmuls for dense NHWC/HWIO convolutions, shifted sums for depthwise
  ones, lax for the rest. Max pools whose windows tile the input
  (`reduce_window_max` with stride = window, VALID) become
  `ondevice.models.layers.windowed_max`, equal bit for bit with gradients
  that XLA:CPU's select-and-scatter computes about 8x more slowly. So stock
  `nn.Conv` / `hk.Conv2D` / max-pool models get the CPU speed of the
  library's own, in a scan and under a vmap, where XLA:CPU runs its native
  convolution (and above all its gradients) slowly.
  """
  def rewritten(*args):
    closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(*args)
    if not execution.primitive_names(closed.jaxpr) & REWRITTEN_PRIMITIVES:
      return loss_fn(*args)  # Nothing to rewrite: the loss as written.
    outs = _eval_rewriting_convs(closed.jaxpr, closed.consts,
                                 *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return rewritten


def resolve_conv(conv: str, backend: str | None = None) -> str:
  """'native' or 'im2col' for LocalConfig.conv ('auto': im2col on a CPU)."""
  if conv != 'auto':
    return conv
  return 'im2col' if (backend or jax.default_backend()) == 'cpu' else (
      'native')


def resolve_loop(loop: str, scan_length: int, primitives: set[str],
                 backend: str | None = None) -> str:
  """The local loop to run: 'scan' or 'unroll'.

  The 'auto' rule: on a CPU backend, unroll when the local step holds a
  convolution (`conv_general_dilated`, as stock `flax.linen.Conv` and
  `hk.Conv2D` emit) and there are at most AUTO_UNROLL_MAX_STEPS steps;
  otherwise scan. Measured with benchmarks/client_loop.py (results in
  benchmarks/results/fedjax_comparison/client_loop.json): a step of XLA
  convolutions runs several times faster unrolled than in a scan, while
  steps of matmuls only (dense layers, the library's im2col convolutions)
  run as fast or faster in a scan and compile faster there. Other backends
  scan: nothing was measured there.

  Args:
    loop: LocalConfig.loop.
    scan_length: number of local steps.
    primitives: primitive names of one local step
      (`execution.traced_primitives`).
    backend: default `jax.default_backend()`.
  """
  if loop != 'auto':
    return loop
  backend = backend or jax.default_backend()
  if (backend == 'cpu' and primitives & execution.CONV_PRIMITIVES and
      scan_length <= AUTO_UNROLL_MAX_STEPS):
    return 'unroll'
  return 'scan'


def _batch_source(client_data, local: LocalConfig, batch_key: jax.Array):
  """(`batch_at(step, cache) -> (batch, cache)`, the initial cache).

  Each epoch's order is drawn when its first step comes and kept in the
  loop's carry ('fill' batching keeps the latest of the two epochs a batch
  can span, and draws per position when n < B): the orders `local_batch`
  draws, without a PRNG draw per step (on XLA:CPU one is a rolled loop of
  tiny ops, which cost more than a small dense model's whole step; under a
  vmap the cond is a select and every step draws, as before).
  """
  valid = client_data['mask'] > 0

  def batch_at(step, cache):
    if local.last_batch == 'fill':
      return _cached_filled_batch(client_data, batch_key, step,
                                  local.batch_size, local.num_epochs, cache)
    position = _epoch_position(client_data, step, local.batch_size)
    epoch = position[1]
    cached_epoch, cached_order = cache
    order = lax.cond(epoch == cached_epoch, lambda: cached_order,
                     lambda: _epoch_order(batch_key, epoch, valid))
    return _masked_batch(client_data, order, position, local.batch_size,
                         local.num_epochs), (epoch, order)

  return batch_at, (jnp.int32(0), _epoch_order(batch_key, jnp.int32(0),
                                               valid))


def _local_steps(step_fn, local: LocalConfig, client_data, key, state):
  """Runs the local steps; returns (final state, per-step summed metrics)."""
  batch_key, step_key = jax.random.split(key)
  scan_length = local.scan_length(client_data['mask'].shape[0])

  def train_step(state, batch, step):
    state, metrics = step_fn(state, batch,
                             jax.random.fold_in(step_key, step))
    # 'loss' and 'grad_norm' are per-step means, not sums: dropped here.
    return state, {k: v for k, v in metrics.items()
                   if k not in ('loss', 'grad_norm')}

  def skip_step(state, batch, step):
    # An all-padding batch: the train step would leave the state as it is
    # and sum zeros; skipping it saves the work when the client update runs
    # unbatched (streamed execution). Under vmap, lax.cond becomes a select
    # and both branches run, as before.
    sums = jax.eval_shape(train_step, state, batch, step)[1]
    return state, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums)

  batch_at, cache = _batch_source(client_data, local, batch_key)

  def body(carry, step):
    state, cache = carry
    batch, cache = batch_at(step, cache)
    state, sums = lax.cond(jnp.any(batch['mask'] > 0), train_step,
                           skip_step, state, batch, step)
    return (state, cache), sums

  def unrolled_body(carry, step):
    # No cond around the step: XLA:CPU runs a convolution inside a
    # conditional as slowly as inside a loop, and the train step is a no-op
    # on padding anyway.
    state, cache = carry
    batch, cache = batch_at(step, cache)
    state, sums = train_step(state, batch, step)
    return (state, cache), sums

  primitives = set()
  if local.loop == 'auto':
    one_batch = jax.eval_shape(lambda s: batch_at(s, cache)[0], jnp.int32(0))
    primitives = execution.traced_primitives(train_step, state, one_batch,
                                             jnp.int32(0))
  loop = resolve_loop(local.loop, scan_length, primitives)
  logging.info('Client update: %d local steps as %s (LocalConfig.loop=%r).',
               scan_length, loop, local.loop)
  execution.record_choice('local_loop', loop)
  (final, _), per_step = lax.scan(
      unrolled_body if loop == 'unroll' else body, (state, cache),
      jnp.arange(scan_length), unroll=loop == 'unroll')
  return final, per_step


def make_client_update(loss_fn: train.LossFn | Any,
                       optimizer: optax.GradientTransformation,
                       local: LocalConfig,
                       loss_wrapper: LossWrapper | None = None):
  """Builds the pure `client_update`.

  Args:
    loss_fn: `(params, model_state, batch, rng) -> (loss, (sums, state))`,
      e.g. `ondevice.train.classification_loss(model)`, possibly wrapped by a
      regulariser or built on a quantised model; or a `fedjax.Model`, whose
      per-example `train_loss` becomes the masked mean loss
      (`fedjax_interop.as_loss_fn`).
    optimizer: the local (client) optimiser; its state starts fresh every
      round.
    local: steps / epochs / batch size / trainable params / loop.
    loss_wrapper: optional `(loss_fn, server_trainable, context) -> loss_fn`
      applied every round, e.g. FedProx's proximal term.

  Returns:
    `client_update(server_params, model_state, client_data, key,
    context=None) -> ClientOutput`, where client_data is one client's
    {'x': [M, ...], 'y': [M], 'mask': [M]}. Pure, jittable and vmappable.
  """
  loss_fn = fedjax_interop.as_loss_fn(loss_fn)
  conv = resolve_conv(local.conv)
  logging.info('Client update: convolutions %s (LocalConfig.conv=%r).', conv,
               local.conv)
  execution.record_choice('conv', conv)
  if conv == 'im2col':
    loss_fn = with_cpu_convolutions(loss_fn)

  def client_update(server_params: PyTree, model_state: PyTree,
                    client_data: Mapping[str, jax.Array], key: jax.Array,
                    context: PyTree = None) -> ClientOutput:
    # Nested at every '/' of a path, as the train step returns params (a
    # no-op for flax params; haiku's 'mlp/~/linear_0' modules nest).
    server_params = train.unflatten_params(
        train.flatten_params(server_params))
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
    final, per_step = _local_steps(step_fn, local, client_data, key, state)
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
