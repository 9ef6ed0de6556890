"""Memory, compute and communication accounting for training steps.

Two views of what a training step costs, which tests hold against each other:

* `compiled_cost(fn, *args)`: what XLA allocates and counts for the jitted
  function: `jax.jit(fn).lower(*args).compile().memory_analysis()` (argument,
  output, temporary bytes) and `.cost_analysis()` (FLOPs).
* `analytic_training_memory(...)`: a breakdown into frozen weights, trainable
  weights, gradients, optimiser state and *stored activations*: the tensors
  that must outlive the forward pass because some backward rule reads them.
  This is the accounting of TinyTL (Cai et al., 2020, "TinyTL: Reduce Memory,
  Not Parameters for Efficient On-Device Learning"), BitFit-style bias-only
  updates (Ben Zaken et al., 2022) and the Tiny Training Engine (Lin et al.,
  2022, "On-Device Training Under 256KB Memory").

Stored activations are derived from the model's forward jaxpr, one backward
rule per primitive, keeping only what gradients of the *trainable* leaves
need (a value is "on the gradient path" when it depends on a trainable leaf):
  y = x @ W, conv(x, W)  dW needs x; dx needs W (a weight, not an activation).
                         So a frozen W costs nothing to back-propagate
                         through, and a trainable W costs its layer's input.
  y = x + b              nothing: db is a sum of dy. Bias-only training
                         therefore stores no layer inputs at all.
  y = relu(x)            the sign of x: `relu_mask_bits` per element (XLA
                         keeps the float32 input for stock `jax.nn.relu`, 32
                         bits; `sparse_updates.compact_relu` keeps 1 bit).
  y = a * b              da needs b, db needs a (norm statistics, scales).
  exp, log, rsqrt, ...   the input; max-pool: the input; select: the mask.
A view (a broadcast of a per-channel vector, a reshape) counts as the
tensor it is derived from, which XLA keeps instead, and the input batch is
an argument, not a stored activation. The transient
working set of the backward pass itself (a few activation-sized buffers at
a time) is not included, which is why the compiled figure exceeds the
analytic one by a bounded amount (tests/test_cost.py).

`bytes_of_trainable(params, paths)` is what a federated client uploads per
round when only the trainable leaves are sent.

This module imports no research area.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

from ondevice import train

# Primitives whose VJP needs none of their inputs.
_LINEAR = frozenset({
    'add', 'add_any', 'sub', 'neg', 'reduce_sum', 'broadcast_in_dim',
    'reshape', 'transpose', 'squeeze', 'expand_dims', 'convert_element_type',
    'copy', 'copy_p', 'pad', 'slice', 'dynamic_slice', 'dynamic_update_slice',
    'concatenate', 'reduce_window_sum', 'cumsum', 'gather', 'scatter-add',
    'scatter_add', 'rev', 'split', 'reduce_precision', 'real', 'imag',
    'conj', 'select_and_scatter_add', 'optimization_barrier'})
# Primitives with no gradient: their outputs are off the gradient path.
_NON_DIFFERENTIABLE = frozenset({
    'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'and', 'or', 'not', 'xor', 'iota',
    'argmax', 'argmin', 'sign', 'floor', 'ceil', 'round', 'is_finite',
    'shift_left', 'shift_right_logical', 'shift_right_arithmetic',
    'population_count', 'stop_gradient', 'random_bits', 'random_seed',
    'random_wrap', 'random_unwrap', 'random_fold_in', 'random_split',
    'threefry2x32'})
# Elementwise or reducing nonlinearities: the backward reads the input.
_NEEDS_INPUT = frozenset({
    'exp', 'exp2', 'expm1', 'log', 'log1p', 'tanh', 'logistic', 'sqrt',
    'rsqrt', 'cbrt', 'integer_pow', 'square', 'sin', 'cos', 'tan', 'erf',
    'erfc', 'erf_inv', 'abs', 'pow', 'atan2', 'max', 'min', 'reduce_max',
    'reduce_min', 'reduce_prod', 'reduce_window_max', 'reduce_window_min',
    'cumprod', 'cummax', 'cummin', 'sort', 'lgamma', 'digamma', 'clamp'})
_BILINEAR = frozenset({'mul', 'dot_general', 'conv_general_dilated'})
# Outputs that XLA derives from their first operand on the fly (a broadcast
# of a per-channel vector, a reshape), so keeping one for the backward pass
# keeps its source instead. Slices are not views: XLA's CPU backend keeps
# each shifted slice that a backward rule reads as a buffer of its own.
_VIEWS = frozenset({'broadcast_in_dim', 'reshape', 'convert_element_type',
                    'squeeze', 'expand_dims', 'transpose', 'copy'})
_INLINE = frozenset({'jit', 'pjit', 'custom_jvp_call', 'custom_vjp_call',
                     'remat', 'checkpoint'})


class CompiledCost(NamedTuple):
  """What XLA reports for one compiled function (bytes and operations)."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  peak_bytes: int  # argument + output + temp - alias.
  flops: float
  bytes_accessed: float


def compiled_cost(fn: Callable[..., Any], *args,
                  donate_argnums: Sequence[int] = (), **kwargs
                  ) -> CompiledCost:
  """Compiles `fn(*args, **kwargs)` with jax.jit and reads XLA's analyses.

  Args:
    fn: any jittable function (e.g. a train step); already-jitted is fine.
    *args: example arguments (arrays or ShapeDtypeStructs).
    donate_argnums: as for jax.jit; donated inputs alias outputs.
    **kwargs: keyword arguments for `fn`.
  """
  compiled = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(
      *args, **kwargs).compile()
  memory = compiled.memory_analysis()
  if memory is None:
    raise ValueError(f'The {jax.default_backend()} backend reports no memory '
                     'analysis; run the accounting on CPU or GPU.')
  costs = compiled.cost_analysis() or {}
  if isinstance(costs, (list, tuple)):  # Older JAX: one dict per device.
    costs = costs[0] if costs else {}
  arg, out = int(memory.argument_size_in_bytes), int(
      memory.output_size_in_bytes)
  temp, alias = int(memory.temp_size_in_bytes), int(
      memory.alias_size_in_bytes)
  return CompiledCost(argument_bytes=arg, output_bytes=out, temp_bytes=temp,
                      alias_bytes=alias, peak_bytes=arg + out + temp - alias,
                      flops=float(costs.get('flops', 0.0)),
                      bytes_accessed=float(costs.get('bytes accessed', 0.0)))


def _nbytes(leaf) -> int:
  return int(np.prod(np.shape(leaf))) * jnp.dtype(leaf.dtype).itemsize


def bytes_of_tree(tree: Any) -> int:
  """Bytes of every array leaf of a PyTree (arrays or ShapeDtypeStructs)."""
  return sum(_nbytes(leaf) for leaf in jax.tree.leaves(tree)
             if hasattr(leaf, 'dtype'))


def bytes_of_trainable(params: Any, paths: Sequence[str],
                       masks: Mapping[str, Any] | None = None) -> int:
  """Bytes of the trainable values: what a client sends per round.

  Args:
    params: parameter tree.
    paths: trainable paths (from `train.resolve_trainable` or rules).
    masks: optional {path: boolean mask broadcastable to the leaf} for
      leaves of which only some elements train; only those are sent (the
      mask itself is fixed by the scheme and known to the server).
  """
  flat = train.flatten_params(params)
  unknown = sorted(set(paths) - set(flat))
  if unknown:
    raise ValueError(f'Paths {unknown} are not parameters; valid paths are '
                     f'{sorted(flat)}.')
  total = 0
  for path in paths:
    leaf = flat[path]
    if masks is not None and path in masks:
      full = np.broadcast_to(np.asarray(masks[path], bool), np.shape(leaf))
      total += int(full.sum()) * jnp.dtype(leaf.dtype).itemsize
    else:
      total += _nbytes(leaf)
  return total


class MemoryBreakdown(NamedTuple):
  """Analytic training memory of one step, in bytes.

  `training` excludes the frozen weights, which a device holds for inference
  anyway; `total` includes them. `activations_by_layer` charges each stored
  tensor to the module whose backward rule reads it (a ReLU's mask to the
  layer before the ReLU); `unknown_primitives` lists primitives without a
  rule here, whose activation inputs were all counted (an upper bound).
  """
  frozen_weights: int
  trainable_weights: int
  gradients: int
  optimizer_state: int
  activations: int
  activations_by_layer: dict[str, int]
  unknown_primitives: tuple[str, ...]

  @property
  def training(self) -> int:
    return (self.trainable_weights + self.gradients + self.optimizer_state +
            self.activations)

  @property
  def total(self) -> int:
    return self.training + self.frozen_weights


def _module_of(eqn) -> str:
  """'SmallCNN/SmallCNN._forward/conv1' -> 'conv1' (method scopes dropped)."""
  parts = str(eqn.source_info.name_stack).split('/')[1:]
  return '/'.join(p for p in parts if p and '.' not in p)


def _is_relu(eqn) -> bool:
  if eqn.primitive.name != 'custom_jvp_call':
    return False
  inner = eqn.params['call_jaxpr'].jaxpr.eqns
  return len(inner) == 1 and inner[0].params.get('name') == 'relu'


def _inner_jaxpr(eqn):
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    inner = eqn.params.get(key)
    if inner is not None:
      return getattr(inner, 'jaxpr', inner)
  return None


class _Walker:
  """Propagates 'on the gradient path' / 'is an activation' through a jaxpr
  and collects the activations that backward rules read."""

  def __init__(self, relu_mask_bits: int, data):
    self.relu_mask_bits = relu_mask_bits
    self.data = data  # The input batch: an argument, never stored.
    self.grad, self.act = set(), set()
    self.origin = {}  # View -> the tensor it is derived from.
    self.stored: dict[Any, tuple[int, str]] = {}
    self.unknown: set[str] = set()
    self.layer = ''

  def need(self, var, bits: int | None = None) -> None:
    """Charges `var` (its source, for a view) if it is an activation."""
    if isinstance(var, jex_core.Literal):
      return
    root = self.origin.get(var, var)
    if root not in self.act or root is self.data:
      return
    if bits is None:
      bits = 8 * jnp.dtype(root.aval.dtype).itemsize
    key = (root, bits)
    if key not in self.stored:
      nbytes = math.ceil(int(np.prod(root.aval.shape)) * bits / 8)
      self.stored[key] = (nbytes, self.layer)

  def run(self, jaxpr) -> None:
    for eqn in jaxpr.eqns:
      module = _module_of(eqn)
      # An op in a parent scope (a ReLU between layers) belongs to the layer
      # before it.
      if module and not self.layer.startswith(module + '/'):
        self.layer = module
      ins = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
      name = eqn.primitive.name
      if name in _INLINE and not _is_relu(eqn):
        inner = _inner_jaxpr(eqn)
        if inner is not None and len(inner.invars) == len(eqn.invars):
          for outer, var in zip(eqn.invars, inner.invars):
            self._copy(outer, var)
          self.run(inner)
          for var, outer in zip(inner.outvars, eqn.outvars):
            self._copy(var, outer)
          continue
      grad_in = [v for v in ins if v in self.grad]
      if grad_in:
        self._rule(eqn, name)
      on_path = bool(grad_in) and name not in _NON_DIFFERENTIABLE
      activation = any(v in self.act for v in ins)
      for out in eqn.outvars:
        if on_path and jnp.issubdtype(out.aval.dtype, jnp.inexact):
          self.grad.add(out)
        if activation:
          self.act.add(out)
      if name in _VIEWS and eqn.invars and not isinstance(
          eqn.invars[0], jex_core.Literal):
        self.origin[eqn.outvars[0]] = self.origin.get(eqn.invars[0],
                                                      eqn.invars[0])

  def _copy(self, src, dst) -> None:
    if isinstance(src, jex_core.Literal) or isinstance(dst, jex_core.Literal):
      return
    for group in (self.grad, self.act):
      if src in group:
        group.add(dst)
    self.origin[dst] = self.origin.get(src, src)

  def on_path(self, var) -> bool:
    return not isinstance(var, jex_core.Literal) and var in self.grad

  def _rule(self, eqn, name: str) -> None:
    ins = eqn.invars
    if _is_relu(eqn):
      self.need(ins[0], self.relu_mask_bits)
    elif name in _BILINEAR:
      if self.on_path(ins[0]):
        self.need(ins[1])
      if self.on_path(ins[1]):
        self.need(ins[0])
    elif name == 'div':
      if self.on_path(ins[0]):
        self.need(ins[1])
      if self.on_path(ins[1]):
        self.need(ins[1])
        self.need(eqn.outvars[0])
    elif name in _NEEDS_INPUT:
      for var in ins:
        self.need(var)
    elif name == 'select_n':
      self.need(ins[0])
    elif name in _LINEAR or name in _NON_DIFFERENTIABLE:
      pass
    else:
      self.unknown.add(name)
      for var in ins:
        self.need(var)


def analytic_training_memory(
    model, params: Any, trainable_paths: Sequence[str],
    batch_shape: Sequence[int], optimizer_slots: int, *,
    model_state: Any = None, train_mode: bool = True,
    relu_mask_bits: int = 32, input_dtype=jnp.float32) -> MemoryBreakdown:
  """The analytic breakdown of one training step's memory.

  Args:
    model: flax module applied as `model.apply(variables, x, train=...)`.
    params: its parameter tree (arrays or ShapeDtypeStructs).
    trainable_paths: the leaves that train (e.g. `rules.trainable_paths`).
    batch_shape: shape of the input batch, e.g. (16, 98, 40).
    optimizer_slots: full-size optimiser buffers per trainable leaf (SGD 0,
      momentum 1, Adam 2).
    model_state: other variable collections (e.g. batch_stats), if any.
    train_mode: how the model runs in the step (batch norm statistics).
    relu_mask_bits: bits a ReLU keeps per element for its backward pass:
      32 for stock jax.nn.relu under XLA, 1 with `compact_relu`.
    input_dtype: dtype of the input batch.
  """
  if optimizer_slots < 0:
    raise ValueError(f'optimizer_slots must be >= 0; got {optimizer_slots}.')
  flat = train.flatten_params(params)
  unknown = sorted(set(trainable_paths) - set(flat))
  if unknown:
    raise ValueError(f'Trainable paths {unknown} are not parameters; valid '
                     f'paths are {sorted(flat)}.')
  trainable = [p for p in flat if p in set(trainable_paths)]
  frozen = [p for p in flat if p not in set(trainable_paths)]
  walker = _walk_forward(model, flat, trainable, frozen,
                         dict(model_state or {}), batch_shape, train_mode,
                         relu_mask_bits, input_dtype)
  by_layer: dict[str, int] = {}
  for nbytes, layer in walker.stored.values():
    by_layer[layer] = by_layer.get(layer, 0) + nbytes
  trainable_bytes = sum(_nbytes(flat[p]) for p in trainable)
  return MemoryBreakdown(
      frozen_weights=sum(_nbytes(flat[p]) for p in frozen),
      trainable_weights=trainable_bytes,
      gradients=trainable_bytes,
      optimizer_state=optimizer_slots * trainable_bytes,
      activations=sum(by_layer.values()),
      activations_by_layer=by_layer,
      unknown_primitives=tuple(sorted(walker.unknown)))


def _walk_forward(model, flat, trainable, frozen, model_state, batch_shape,
                  train_mode, relu_mask_bits, input_dtype) -> '_Walker':
  """Traces the forward pass and records what its backward pass keeps."""

  def forward(t_leaves, f_leaves, state, x):
    tree = train.unflatten_params({**dict(zip(trainable, t_leaves)),
                                   **dict(zip(frozen, f_leaves))})
    variables = {'params': tree, **state}
    if train_mode and state:
      return model.apply(variables, x, train=True, mutable=list(state))[0]
    return model.apply(variables, x, train=train_mode)

  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)
  t_specs = [spec(flat[p]) for p in trainable]
  f_specs = [spec(flat[p]) for p in frozen]
  x_spec = jax.ShapeDtypeStruct(tuple(batch_shape), input_dtype)
  closed = jax.make_jaxpr(forward)(t_specs, f_specs,
                                   jax.tree.map(spec, model_state), x_spec)
  jaxpr = closed.jaxpr
  walker = _Walker(relu_mask_bits, data=jaxpr.invars[-1])
  walker.grad.update(jaxpr.invars[:len(trainable)])
  walker.act.add(jaxpr.invars[-1])
  walker.run(jaxpr)
  return walker


def optimizer_slots(optimizer_name: str) -> int:
  """Full-size state buffers per parameter for the optimisers in ondevice."""
  slots = {'sgd': 0, 'momentum': 1, 'adam': 2, 'adamw': 2}
  if optimizer_name not in slots:
    raise ValueError(f'Unknown optimizer {optimizer_name!r}; choose one of '
                     f'{sorted(slots)} or pass the slot count yourself.')
  return slots[optimizer_name]
