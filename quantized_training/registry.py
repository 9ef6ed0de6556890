"""Quantisation modes selected by name (``config.quant``).

Every model built with ``build_model(name, ..., **get_quant(q).model_kwargs())``
gets the mode's int8 matmuls injected through flax's ``dot_general_cls`` /
``conv_general_dilated_cls``; a train step whose ``spec.needs_rng`` is true
passes ``rngs={'quant': key}`` to ``apply``.

| name                   | fwd  | input grad | weight grad | rounding | path |
| ---------------------- | ---- | ---------- | ----------- | -------- | ---- |
| none                   | f32  | f32        | f32         | -        | -    |
| int8_fwd               | int8 | f32 (STE)  | f32 (STE)   | nearest  | sim  |
| int8_fwd_bwd           | int8 | int8       | int8        | nearest  | sim  |
| int8_fwd_bwd_sr        | int8 | int8       | int8        | stoch.   | sim  |
| int8_fwd_bwd_fgrad     | int8 | int8       | f32         | nearest  | sim  |
| int8_fwd_bwd_sr_fgrad  | int8 | int8       | f32         | stoch.   | sim  |
| int8_fwd_bwd_sr_int    | int8 | int8       | int8        | stoch.   | int  |
| int8_fwd_bwd_sr_tensor | int8 | int8       | int8        | stoch.   | sim  |

"sim" runs float32 matmuls on integer-valued codes (the fastest path on
CPU, where XLA widens some int8 matmuls to int32); "int" runs
int8 x int8 -> int32 matmuls. On the "sim" path convolutions use the fast
CPU forms (``impl='cpu_friendly'``: depthwise convs as shifted elementwise
products of the int8 codes, dense convs as im2col matmuls of them), exactly
as the float models do; the "int" path keeps ``lax`` convolutions. "_tensor" uses one scale per tensor instead of
per row / per channel. ``_fgrad`` follows SwitchBack (Wortsman et al. 2023).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from quantized_training import config as qconfig
from quantized_training.config import BwdConfig, Int8Config
from quantized_training.int8_conv import int8_conv_general_dilated
from quantized_training.int8_conv import uses_int_path
from quantized_training.int8_dot import int8_dot_general
from quantized_training.layers import Int8ConvGeneralDilated, Int8DotGeneral


def _fwd_only() -> Int8Config:
  return Int8Config(dlhs=BwdConfig(bits=None), drhs=BwdConfig(bits=None))


_CONFIGS = {
    'none': lambda: None,
    'int8_fwd': _fwd_only,
    'int8_fwd_bwd': lambda: qconfig.uniform(8),
    'int8_fwd_bwd_sr': lambda: qconfig.uniform(8, stochastic_rounding=True),
    'int8_fwd_bwd_fgrad': lambda: qconfig.uniform(8, float_weight_grad=True),
    'int8_fwd_bwd_sr_fgrad': lambda: qconfig.uniform(
        8, stochastic_rounding=True, float_weight_grad=True),
    'int8_fwd_bwd_sr_int': lambda: qconfig.uniform(
        8, stochastic_rounding=True, use_int=True),
    'int8_fwd_bwd_sr_tensor': lambda: qconfig.uniform(
        8, stochastic_rounding=True, per_channel=False),
}

QUANT_NAMES: tuple[str, ...] = tuple(_CONFIGS)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """A resolved quantisation mode.

  Attributes:
    name: the mode's name.
    config: the layer config, None for 'none'.
    dot_general_cls: pass to ``nn.Dense(dot_general_cls=...)``; None: float.
    conv_general_dilated_cls: pass to ``nn.Conv(conv_general_dilated_cls=...)``.
    needs_rng: whether ``apply`` needs ``rngs={'quant': key}`` when training.
    conv_impl: how quantised convolutions run: 'cpu_friendly' (shifted sums
      and im2col matmuls of the codes) on the simulated path, 'lax' on the
      integer path.
  """
  name: str
  config: Int8Config | None
  dot_general_cls: Any
  conv_general_dilated_cls: Any
  needs_rng: bool
  conv_impl: str = 'lax'

  def model_kwargs(self) -> dict[str, Any]:
    """Keyword arguments for ``build_model(name, num_classes, **kwargs)``."""
    return {'dot_general_cls': self.dot_general_cls,
            'conv_general_dilated_cls': self.conv_general_dilated_cls}

  def functional_kwargs(self, key: jax.Array | None = None) -> dict[str, Any]:
    """``dot_general=`` / ``conv_general_dilated=`` functions for a model.

    Unlike ``model_kwargs``, every layer then shares ``key`` (the same dither
    pattern per layer shape); prefer ``model_kwargs`` with
    ``rngs={'quant': key}`` for training.
    """
    if self.config is None:
      return {'dot_general': None, 'conv_general_dilated': None}
    if self.needs_rng and key is None:
      raise ValueError(f'Quant mode {self.name!r} rounds gradients '
                       'stochastically: pass key= to functional_kwargs.')
    return {
        'dot_general': functools.partial(int8_dot_general,
                                         config=self.config, key=key),
        'conv_general_dilated': functools.partial(
            int8_conv_general_dilated, config=self.config, key=key,
            impl=self.conv_impl)}


def spec_from_config(name: str, config: Int8Config | None) -> QuantSpec:
  """Wraps any ``Int8Config`` (or None for float) into a ``QuantSpec``."""
  if config is None or config.is_float:
    return QuantSpec(name, None, None, None, False)
  impl = 'lax' if uses_int_path(config) else 'cpu_friendly'
  return QuantSpec(
      name=name, config=config,
      dot_general_cls=functools.partial(Int8DotGeneral, config=config),
      conv_general_dilated_cls=functools.partial(
          Int8ConvGeneralDilated, config=config, impl=impl),
      needs_rng=config.needs_rng, conv_impl=impl)


def get_quant(name: str) -> QuantSpec:
  """Resolves ``config.quant``; raises ValueError listing valid names."""
  if name not in _CONFIGS:
    raise ValueError(f'Unknown quant mode {name!r}; set config.quant to one '
                     f'of {", ".join(QUANT_NAMES)}.')
  return spec_from_config(name, _CONFIGS[name]())
