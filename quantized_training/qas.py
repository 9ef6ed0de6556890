"""Quantisation-aware scaling (QAS) for training int8 weights directly.

Lin et al. 2022, "On-Device Training Under 256KB Memory" (MCUNetV3), train the
*real* quantised graph: the trainable tensors are the integer weights
``W_int = W / s_W`` (per output channel) and integer biases
``b_int = b / (s_W * s_x)``. By the chain rule ``G_Wint = s_W * G_W``, so

    ||W_int|| / ||G_Wint||  ~=  s_W**-2 * ||W|| / ||G_W||,

i.e. the weight-to-gradient ratio, which every optimiser's learning rate is
tuned for, is off by ``s_W**-2`` (~1e4 for int8), differently per channel.
QAS rescales the gradient to undo it:

    G~_Wint = G_Wint * s_W**-2,       G~_bint = G_bint * (s_W * s_x)**-2.

With QAS, SGD on ``W_int`` moves ``W = s_W * W_int`` exactly as float SGD on
``W`` would (``W_int - lr * s**-2 * s * G_W = (W - lr * G_W) / s``).

In this library the transformation is an ``optax.GradientTransformation``
over the integer-domain parameters; ``integer_domain`` / ``float_domain``
convert a float param tree to ``W_int`` (with the scales) and back, so a loss
written for float params trains the integer graph as
``loss(float_domain(int_params, scales))``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from quantized_training import quantizers

PyTree = Any


class QASState(NamedTuple):
  """QAS keeps no state; the scales are fixed at quantisation time."""


def _is_none(x) -> bool:
  return x is None


def quantization_aware_scaling(scales: PyTree) -> optax.GradientTransformation:
  """Scales each gradient leaf by ``scale**-2`` (Lin et al. 2022).

  Args:
    scales: a PyTree with the structure of the params whose leaves are either
      None (leave that gradient alone, e.g. float parameters) or an array
      broadcastable to the leaf (per-output-channel ``s_W`` for a kernel,
      ``s_W * s_x`` for a bias).

  Returns:
    An optax transformation; chain it before the optimiser.
  """

  def init_fn(params):
    del params
    return QASState()

  def update_fn(updates, state, params=None):
    del params

    def rescale(scale, update):
      if scale is None:
        return update
      return update * jnp.asarray(scale, update.dtype) ** -2

    try:
      updates = jax.tree.map(rescale, scales, updates, is_leaf=_is_none)
    except ValueError as e:
      raise ValueError(
          'QAS scales must mirror the params tree (None for leaves to leave '
          f'unscaled); build them with kernel_scales(params). ({e})') from None
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _default_is_kernel(path, leaf) -> bool:
  name = getattr(path[-1], 'key', getattr(path[-1], 'name', None))
  return name == 'kernel' and getattr(leaf, 'ndim', 0) >= 2


def kernel_scales(params: PyTree, bits: int = 8,
                  is_kernel: Callable[[Any, Any], bool] = _default_is_kernel
                  ) -> PyTree:
  """Per-output-channel (last axis) absmax scales of every kernel, else None.

  Args:
    params: float parameters (e.g. a pre-trained model's).
    bits: integer width of the weights.
    is_kernel: ``(key_path, leaf) -> bool`` selecting the quantised leaves;
      by default leaves named 'kernel' with at least two axes (flax Dense and
      Conv kernels, whose last axis is the output channel).
  """
  quantizer = quantizers.Quantizer(bits=bits, channel_axes=(-1,))

  def scale(path, leaf):
    return quantizer.scale(leaf) if is_kernel(path, leaf) else None

  return jax.tree_util.tree_map_with_path(scale, params)


def integer_domain(params: PyTree, scales: PyTree, bits: int = 8) -> PyTree:
  """``W_int = clip(round(W / s))`` for scaled leaves (float32 codes)."""

  def to_int(scale, leaf):
    if scale is None:
      return leaf
    return quantizers.quantize(leaf, scale, bits)

  return jax.tree.map(to_int, scales, params, is_leaf=_is_none)


def float_domain(int_params: PyTree, scales: PyTree) -> PyTree:
  """``W = s * W_int`` for scaled leaves; other leaves pass through."""

  def to_float(scale, leaf):
    return leaf if scale is None else leaf * scale

  return jax.tree.map(to_float, scales, int_params, is_leaf=_is_none)


def round_integer_params(int_params: PyTree, scales: PyTree, bits: int = 8,
                         key: jax.Array | None = None) -> PyTree:
  """Snaps updated integer-domain leaves back onto the int grid.

  Round-to-nearest by default; with ``key``, stochastic rounding, which keeps
  updates smaller than one step alive in expectation.
  """
  leaves, treedef = jax.tree.flatten(scales, is_leaf=_is_none)
  keys = ([None] * len(leaves) if key is None
          else list(jax.random.split(key, len(leaves))))
  keys = jax.tree.unflatten(treedef, keys)

  def snap(scale, leaf_key, leaf):
    if scale is None:
      return leaf
    dither = None
    if leaf_key is not None:
      dither = quantizers.uniform_dither(leaf_key, leaf.shape)
    return quantizers.quantize(leaf, jnp.ones((), leaf.dtype), bits,
                               dither=dither)

  return jax.tree.map(snap, scales, keys, int_params, is_leaf=_is_none)
