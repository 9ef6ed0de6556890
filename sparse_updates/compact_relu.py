"""ReLUs that keep a 1-bit mask for the backward pass (TinyTL, Section 3.1).

Cai et al. (2020), "TinyTL: Reduce Memory, Not Parameters for Efficient
On-Device Learning": when weights are frozen and only biases train, no layer
needs its input activation for a weight gradient, and the backward pass of a
ReLU needs only the sign of its input, a binary mask. That is where bias-only
training saves its memory.

Stock `jax.nn.relu` records the boolean `x > 0` as its residual, but XLA
fuses the comparison into the backward pass and keeps the float32 input
alive instead (32 bits per element; see benchmarks/train_memory.py). Here
the forward pass packs the mask into bits (`pack_signs`), which XLA cannot
recompute from anything smaller, so a bias-only step keeps 1 bit per ReLU
output instead of 32.

`with_compact_relu(fn)` rewrites a function without touching the model: it
traces `fn` to a jaxpr and evaluates it again with every `jax.nn.relu` call
(what `flax.linen.relu` is) replaced by `packed_relu`. The forward values and
gradients are unchanged (relu'(0) = 0, as in JAX):

    loss_fn = with_compact_relu(train.classification_loss(model))
    step = train.make_train_step(loss_fn, optimizer, paths)

ReLUs inside `jit`-wrapped helpers are replaced too; ReLUs inside control
flow (scan, cond, while) or custom-derivative functions are left as they
are. `count_relus` reports how many calls a rewrite would replace.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

_CALL_PRIMITIVES = ('jit', 'pjit')


@jax.custom_vjp
def packed_relu(x: jax.Array) -> jax.Array:
  """max(x, 0), whose backward pass keeps 1 bit per element."""
  return jnp.maximum(x, jnp.zeros_like(x))


_SHIFTS = tuple(range(8))


def pack_signs(x: jax.Array) -> jax.Array:
  """uint8 [ceil(n / 8)]: bit j of byte i is x.flat[8 * i + j] > 0."""
  flat = (x > 0).reshape(-1)
  flat = jnp.pad(flat, (0, -flat.size % 8)).reshape(-1, 8)
  shifts = jnp.asarray(_SHIFTS, jnp.uint8)
  return jnp.sum(flat.astype(jnp.uint8) << shifts, axis=1, dtype=jnp.uint8)


def unpack_signs(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The boolean mask of `shape` that `pack_signs` packed."""
  shifts = jnp.asarray(_SHIFTS, jnp.uint8)
  flat = ((bits[:, None] >> shifts) & 1).reshape(-1)[:math.prod(shape)]
  return flat.reshape(shape).astype(bool)


def _packed_relu_fwd(x):
  return packed_relu(x), pack_signs(x)


def _packed_relu_bwd(bits, g):
  return (jnp.where(unpack_signs(bits, g.shape), g, jnp.zeros_like(g)),)


packed_relu.defvjp(_packed_relu_fwd, _packed_relu_bwd)


def _is_relu(eqn) -> bool:
  """True for the custom_jvp call that `jax.nn.relu` traces to."""
  if eqn.primitive.name != 'custom_jvp_call':
    return False
  inner = eqn.params['call_jaxpr'].jaxpr.eqns
  return (len(inner) == 1 and inner[0].primitive.name in _CALL_PRIMITIVES
          and inner[0].params.get('name') == 'relu')


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # Older JAX returns (subfuns, params).
    subfuns, params = params
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return out if eqn.primitive.multiple_results else [out]


def _eval(jaxpr, consts, args, counter: list[int]) -> list[Any]:
  env = {}

  def read(var):
    return var.val if isinstance(var, jex_core.Literal) else env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if _is_relu(eqn):
      counter[0] += 1
      outs = [packed_relu(invals[0])]
    elif eqn.primitive.name in _CALL_PRIMITIVES:
      inner = eqn.params['jaxpr']
      outs = _eval(inner.jaxpr, inner.consts, invals, counter)
    else:
      outs = _bind(eqn, invals)
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _rewrite(fn: Callable[..., Any], counter: list[int]):
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), counter)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
  return wrapped


def with_compact_relu(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with every `jax.nn.relu` replaced by `packed_relu`.

  Args:
    fn: a function of arrays / PyTrees of arrays (e.g. a `LossFn`); it is
      traced once per call, so wrap it before `jax.jit`, not inside a loop.

  Returns:
    A function with the same signature, values and gradients.
  """
  return _rewrite(fn, [0])


def count_relus(fn: Callable[..., Any], *args) -> int:
  """How many ReLU calls `with_compact_relu(fn)(*args)` would replace."""
  counter = [0]
  jax.eval_shape(_rewrite(fn, counter), *args)
  return counter[0]
