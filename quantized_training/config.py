"""Frozen configuration of a layer's three quantised matmuls.

A dense or convolutional layer runs three matmuls in training: the forward
``y = x W``, the input gradient ``dx = dy W^T`` and the weight gradient
``dW = x^T dy``. Following the AQT library's split of a dot_general into
``fwd``, ``dlhs`` and ``drhs`` and SwitchBack (Wortsman et al. 2023, "Stable
and low-precision training for large-scale vision-language models"), which
keeps the weight gradient in 16-bit, each matmul is configured on its own:

* ``fwd``: bits (None keeps it in float), per-channel scales for each operand
  (per-row / per-example for activations, per-output-channel for weights) or
  one per-tensor scale, a clipping ratio with optional zeroing of the
  straight-through gradient outside it, and the integer path switch.
* ``dlhs`` / ``drhs``: bits for the output gradient (None: that matmul in
  float32, e.g. the SwitchBack weight gradient), per-row or per-tensor
  gradient scales, stochastic rounding of the gradient, integer path switch.

The backward matmuls reuse the forward's quantised operands (the saved int8
activations and weights), folding their scales into the gradient: that is the
exact straight-through gradient of the quantised forward and it stores int8
residuals instead of float ones.
"""

from __future__ import annotations

import dataclasses

from quantized_training import quantizers

_NOISE_IMPLS = ('hash', 'threefry')


def _check_bits(bits, where: str) -> None:
  if bits is None:
    return
  try:
    quantizers.check_bits(bits)
  except ValueError as e:
    raise ValueError(f'{where}.bits: {e}') from None


def _check_int_path(bits, use_int: bool, where: str) -> None:
  if use_int and bits is not None and bits > 8:
    raise ValueError(
        f'{where}: use_int=True runs int8 x int8 -> int32 matmuls, so bits '
        f'must be <= 8 (got {bits}); lower the bits or set use_int=False.')


@dataclasses.dataclass(frozen=True)
class FwdConfig:
  """The forward matmul ``y = lhs . rhs``.

  Attributes:
    bits: integer width of both operands; None keeps the forward in float.
    lhs_per_channel: one scale per row of the lhs (each non-contracted index,
      i.e. per example for activations); False: one per-tensor scale.
    rhs_per_channel: one scale per output channel of the rhs (weights).
    use_int: run the matmul as int8 x int8 -> int32 (the real integer path)
      instead of on integer-valued float32 (the simulated path). The saved
      operands are stored as int8 when the backward matmul that reads them
      is on the integer path too (4x less residual memory).
    clip_ratio: fraction of each slice's absolute maximum mapped to qmax.
    zero_grad_outside_clip: zero the straight-through gradient of inputs that
      were clipped (only matters with clip_ratio < 1).
  """
  bits: int | None = 8
  lhs_per_channel: bool = True
  rhs_per_channel: bool = True
  use_int: bool = False
  clip_ratio: float = 1.0
  zero_grad_outside_clip: bool = False

  def __post_init__(self):
    _check_bits(self.bits, 'fwd')
    _check_int_path(self.bits, self.use_int, 'fwd')
    if not 0.0 < self.clip_ratio <= 1.0:
      raise ValueError(
          f'fwd.clip_ratio must be in (0, 1], got {self.clip_ratio}.')


@dataclasses.dataclass(frozen=True)
class BwdConfig:
  """One backward matmul: the output gradient times a saved forward operand.

  Attributes:
    bits: integer width of the gradient; None runs this matmul in float32
      (against the forward-quantised operand, so it is still the exact
      straight-through gradient).
    per_channel: one gradient scale per non-contracted index (per row);
      False: one per-tensor scale.
    stochastic_rounding: round the gradient stochastically (unbiased); needs a
      PRNG key in the backward pass.
    use_int: run the matmul as int8 x int8 -> int32.
  """
  bits: int | None = 8
  per_channel: bool = True
  stochastic_rounding: bool = False
  use_int: bool = False

  def __post_init__(self):
    _check_bits(self.bits, 'bwd')
    _check_int_path(self.bits, self.use_int, 'bwd')

  @property
  def quantized(self) -> bool:
    return self.bits is not None

  @property
  def needs_rng(self) -> bool:
    return self.quantized and self.stochastic_rounding


@dataclasses.dataclass(frozen=True)
class Int8Config:
  """Configuration of the three matmuls of one quantised layer.

  Attributes:
    fwd: the forward matmul.
    dlhs: the input-gradient matmul (gradient times the weights).
    drhs: the weight-gradient matmul (activations times the gradient).
    noise_bits: resolution of the stochastic-rounding dither (8 or 16).
    noise_impl: 'hash' (fused counter-based hash seeded by the key) or
      'threefry' (``jax.random.bits``) for the dither.
  """
  fwd: FwdConfig = FwdConfig()
  dlhs: BwdConfig = BwdConfig()
  drhs: BwdConfig = BwdConfig()
  noise_bits: int = 16
  noise_impl: str = 'hash'

  def __post_init__(self):
    for name, kind in (('fwd', FwdConfig), ('dlhs', BwdConfig),
                       ('drhs', BwdConfig)):
      if not isinstance(getattr(self, name), kind):
        raise ValueError(f'Int8Config.{name} must be a {kind.__name__}, got '
                         f'{type(getattr(self, name)).__name__}.')
    fwd_bits = self.fwd.bits
    for name in ('dlhs', 'drhs'):
      bwd = getattr(self, name)
      if (bwd.use_int and bwd.quantized and fwd_bits is not None and
          fwd_bits > 8):
        raise ValueError(
            f'{name}.use_int=True multiplies the gradient with the saved int8 '
            f'forward codes, but fwd.bits={fwd_bits}; use fwd.bits <= 8 or '
            f'{name}.use_int=False.')
    if self.noise_bits not in (8, 16):
      raise ValueError(f'noise_bits must be 8 or 16, got {self.noise_bits}.')
    if self.noise_impl not in _NOISE_IMPLS:
      raise ValueError(f'noise_impl must be one of {_NOISE_IMPLS}, got '
                       f'{self.noise_impl!r}.')

  @property
  def needs_rng(self) -> bool:
    """Whether the backward pass draws stochastic-rounding noise."""
    return self.dlhs.needs_rng or self.drhs.needs_rng

  @property
  def is_float(self) -> bool:
    """Whether nothing is quantised (the layer is a plain float matmul)."""
    return (self.fwd.bits is None and not self.dlhs.quantized and
            not self.drhs.quantized)

  def replace(self, **changes) -> Int8Config:
    return dataclasses.replace(self, **changes)


def uniform(bits: int | None = 8, *, stochastic_rounding: bool = False,
            float_weight_grad: bool = False, use_int: bool = False,
            per_channel: bool = True) -> Int8Config:
  """The common shapes of config: everything at ``bits`` with one switch each.

  Args:
    bits: width of all quantised operands.
    stochastic_rounding: round both backward gradients stochastically.
    float_weight_grad: keep the weight-gradient matmul in float (SwitchBack).
    use_int: real integer matmuls everywhere that is quantised.
    per_channel: per-row / per-channel scales (False: per-tensor everywhere).
  """
  fwd = FwdConfig(bits=bits, lhs_per_channel=per_channel,
                  rhs_per_channel=per_channel, use_int=use_int)
  dlhs = BwdConfig(bits=bits, per_channel=per_channel,
                   stochastic_rounding=stochastic_rounding, use_int=use_int)
  drhs = dlhs
  if float_weight_grad:
    drhs = BwdConfig(bits=None)
  return Int8Config(fwd=fwd, dlhs=dlhs, drhs=drhs)
