"""Optimiser state stored in int8: an optax wrapper.

On a device the optimiser state (momentum, Adam moments) is as large as the
trainable parameters; storing it as int8 codes with float32 per-channel scales
cuts it 4x. The wrapper keeps any inner optax transformation unchanged: each
update dequantises the state, runs the inner update, and re-quantises the new
state (symmetric absmax, one scale per last-axis channel for arrays with two
or more axes, per-tensor otherwise), optionally with stochastic rounding so
that small momentum contributions survive in expectation (as in Dettmers et
al. 2022, "8-bit Optimizers via Block-wise Quantization", which uses
block-wise dynamic quantisation for the same purpose).

Signed linear int8 suits first moments (momentum, Adam's ``mu``); a second
moment spans orders of magnitude, so keep it in float with ``keep_float``
(e.g. ``lambda path, leaf: 'nu' in str(path)``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple
import zlib

import jax
import jax.numpy as jnp
import optax

from quantized_training import quantizers

PyTree = Any


class QuantizedArray(NamedTuple):
  """An array stored as integer codes and broadcastable float32 scales."""
  codes: jax.Array
  scale: jax.Array

  def dequantize(self) -> jax.Array:
    return quantizers.dequantize(self.codes, self.scale)


class Int8StateState(NamedTuple):
  """State of ``int8_state``: the inner state with quantised leaves."""
  inner: PyTree
  key: jax.Array | None


def _is_quantized(x) -> bool:
  return isinstance(x, QuantizedArray)


def _never(path, leaf) -> bool:
  del path, leaf
  return False


def _quantize_leaf(path, leaf, key, bits: int, min_size: int,
                   keep_float: Callable[[Any, jax.Array], bool]):
  """Codes and scales of a float state leaf; other leaves pass through."""
  if (not isinstance(leaf, jax.Array) or
      not jnp.issubdtype(leaf.dtype, jnp.floating) or
      leaf.size < min_size or keep_float(path, leaf)):
    return leaf
  channel_axes = (-1,) if leaf.ndim >= 2 else ()
  quantizer = quantizers.Quantizer(
      bits=bits, channel_axes=channel_axes, stochastic=key is not None)
  leaf_key = None
  if key is not None:
    # crc32, not hash(): str hashes change between Python processes.
    path_id = zlib.crc32(jax.tree_util.keystr(path).encode()) % 2**31
    leaf_key = jax.random.fold_in(key, path_id)
  codes, scale = quantizer.quantize(leaf, leaf_key)
  return QuantizedArray(codes, scale)


def int8_state(inner: optax.GradientTransformation, *, bits: int = 8,
               min_size: int = 16, stochastic_rounding: bool = False,
               seed: int = 0,
               keep_float: Callable[[Any, jax.Array], bool] = _never
               ) -> optax.GradientTransformation:
  """Wraps ``inner`` so that its float state is stored as int codes.

  Args:
    inner: the optimiser or transformation whose state is quantised.
    bits: width of the stored codes (int8 for bits <= 8).
    min_size: arrays with fewer elements stay in float (scalars, counts).
    stochastic_rounding: round the state stochastically; the key lives in the
      state, seeded by ``seed``, and is split on every update.
    seed: seed of that key.
    keep_float: ``(key_path, leaf) -> bool``; leaves it selects stay float.

  Returns:
    An optax transformation with the same updates as ``inner`` up to the
    rounding of its state.
  """
  quantizers.check_bits(bits)

  def quantize_state(state, key):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _quantize_leaf(p, x, key, bits, min_size, keep_float),
        state)

  def dequantize_state(state):
    return jax.tree.map(
        lambda x: x.dequantize() if _is_quantized(x) else x, state,
        is_leaf=_is_quantized)

  def init_fn(params):
    key = jax.random.key(seed) if stochastic_rounding else None
    return Int8StateState(quantize_state(inner.init(params), None), key)

  def update_fn(updates, state, params=None, **extra_args):
    inner_state = dequantize_state(state.inner)
    updates, inner_state = inner.update(updates, inner_state, params,
                                        **extra_args)
    key, round_key = state.key, None
    if key is not None:
      key, round_key = jax.random.split(key)
    return updates, Int8StateState(quantize_state(inner_state, round_key),
                                   key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def state_bytes(state: PyTree) -> int:
  """Bytes taken by the arrays of an optimiser state."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
             if hasattr(x, 'dtype') and not jax.dtypes.issubdtype(
                 x.dtype, jax.dtypes.prng_key))
