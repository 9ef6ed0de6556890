"""Flax modules that inject int8 matmuls into ``nn.Dense`` / ``nn.Conv``.

Flax's linear layers take ``dot_general_cls`` / ``conv_general_dilated_cls``:
a class that the layer instantiates with no arguments inside its own
``__call__`` and then calls with the ``lax`` signature. These modules are that
class (configure them with ``functools.partial``), so any linen model is
quantised without being rewritten, the way AQT injects its ``AqtDotGeneral``:

    dense = nn.Dense(10, dot_general_cls=functools.partial(
        Int8DotGeneral, config=config.uniform(8, stochastic_rounding=True)))
    logits, grads = ..., jax.grad(lambda p: loss(dense.apply(
        p, x, rngs={'quant': key})))(params)

The modules own no parameters. Each instance draws its own stochastic-rounding
key from the ``'quant'`` RNG stream (``self.make_rng``) only when its config
rounds gradients stochastically, so one ``rngs={'quant': key}`` in the train
step gives every layer a different key. Without that stream (e.g. ``init`` or
evaluation) no key is drawn; taking a gradient then raises a ValueError that
says to pass the stream.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from quantized_training.config import Int8Config
from quantized_training.int8_conv import int8_conv_general_dilated
from quantized_training.int8_dot import int8_dot_general

QUANT_RNG = 'quant'


def _draw_key(module: nn.Module, config: Int8Config,
              rng_collection: str) -> jax.Array | None:
  if config.needs_rng and module.has_rng(rng_collection):
    return module.make_rng(rng_collection)
  return None


class Int8DotGeneral(nn.Module):
  """``dot_general_cls`` for ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum``.

  Attributes:
    config: how the forward and the two gradient matmuls are quantised.
    rng_collection: the RNG stream stochastic rounding draws from.
  """
  config: Int8Config = Int8Config()
  rng_collection: str = QUANT_RNG

  def __call__(self, lhs, rhs, dimension_numbers, precision: Any = None,
               preferred_element_type: Any = None):
    key = _draw_key(self, self.config, self.rng_collection)
    return int8_dot_general(lhs, rhs, dimension_numbers, precision,
                            preferred_element_type, config=self.config,
                            key=key)


class Int8ConvGeneralDilated(nn.Module):
  """``conv_general_dilated_cls`` for ``nn.Conv`` (including depthwise).

  Attributes:
    config: how the forward and the two gradient convolutions are quantised.
    rng_collection: the RNG stream stochastic rounding draws from.
    impl: 'lax' (reference ``lax.conv_general_dilated``) or 'cpu_friendly'
      (the same quantised convs as shifted sums / im2col matmuls, fast on
      XLA:CPU; simulated path only), see ``int8_conv``.
  """
  config: Int8Config = Int8Config()
  rng_collection: str = QUANT_RNG
  impl: str = 'lax'

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None,
               feature_group_count: int = 1, batch_group_count: int = 1,
               precision: Any = None, preferred_element_type: Any = None):
    key = _draw_key(self, self.config, self.rng_collection)
    return int8_conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, config=self.config, key=key, impl=self.impl)
