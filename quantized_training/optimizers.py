"""Config-selected optimiser forms: int8 optimiser state and QAS.

Two config fields, each a name plus one sub-config per choice (see
`ondevice.options.named`), so every argument is settable from the command
line:

    config.optimizer_state = options.named(optimizers.STATE_FORMATS, 'float')
    #   --config.optimizer_state.name=int8
    #   --config.optimizer_state.int8.stochastic_rounding=True
    config.qas = options.named(optimizers.QAS_MODES, 'none')
    #   --config.qas.name=qas  --config.qas.qas.bits=8

`optimizer_state.name='int8'` stores the optimiser's moments as int8 codes
(`optim_state.int8_state`); Adam's second moment stays float unless
`float_second_moment=False`, since it spans orders of magnitude.

`qas.name='qas'` trains the integer-domain weights `W_int = W / s_W` of the
real quantised graph with gradients rescaled by quantisation-aware scaling
(Lin et al. 2022, see `qas`). The scales are fixed from the params the run
starts from. `build` returns how params move between the float domain of the
model and the domain the optimiser trains in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from flax import traverse_util
import jax
import ml_collections
import optax

from ondevice import options
from quantized_training import optim_state
from quantized_training import qas as qas_lib

PyTree = Any


def float_state() -> Callable[[optax.GradientTransformation],
                              optax.GradientTransformation]:
  """The optimiser's state as it is (float32)."""
  return lambda inner: inner


def _second_moment(path, leaf) -> bool:
  del leaf
  return 'nu' in jax.tree_util.keystr(path)


def int8_optimizer_state(bits: int = 8, min_size: int = 16,
                         stochastic_rounding: bool = False, seed: int = 0,
                         float_second_moment: bool = True
                         ) -> Callable[[optax.GradientTransformation],
                                       optax.GradientTransformation]:
  """Wraps an optimiser so its state is stored as int codes."""
  keep = _second_moment if float_second_moment else (lambda p, x: False)
  return lambda inner: optim_state.int8_state(
      inner, bits=bits, min_size=min_size,
      stochastic_rounding=stochastic_rounding, seed=seed, keep_float=keep)


def no_qas() -> None:
  """Train the float weights."""
  return None


def qas(bits: int = 8) -> int:
  """Train integer-domain weights of `bits` with QAS; returns `bits`."""
  if not 2 <= bits <= 16:
    raise ValueError(f'config.qas.qas.bits must be in [2, 16]; got {bits}.')
  return bits


STATE_FORMATS = {'float': float_state, 'int8': int8_optimizer_state}
QAS_MODES = {'none': no_qas, 'qas': qas}


def _selected(config, key: str, table):
  if key not in config:
    return next(iter(table.values()))()
  factory, kwargs = options.selected(config[key], table, f'config.{key}')
  return factory(**kwargs)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the key for a bad optimizer_state or qas."""
  wrap_state = _selected(config, 'optimizer_state', STATE_FORMATS)
  try:
    wrap_state(optax.sgd(1.0))
  except ValueError as e:
    raise ValueError(f'config.optimizer_state.{config.optimizer_state.name}: '
                     f'{e}') from None
  _selected(config, 'qas', QAS_MODES)


@dataclasses.dataclass(frozen=True)
class TrainingDomain:
  """The optimiser and the domain its params live in.

  Attributes:
    optimizer: the optax transformation over the trainable leaves (a flat
      {path: leaf} dict, as `ondevice.train.make_train_step` passes them).
    to_train: float params -> the params the optimiser updates.
    to_model: those params -> float params for the model.
    wrap_loss: a loss over float params -> a loss over trained params.
  """
  optimizer: optax.GradientTransformation
  to_train: Callable[[PyTree], PyTree]
  to_model: Callable[[PyTree], PyTree]
  wrap_loss: Callable[[Callable[..., Any]], Callable[..., Any]]


def _identity(x):
  return x


def _qas_domain(params, paths: Sequence[str], optimizer, bits: int
                ) -> TrainingDomain:
  """Integer-domain training of every kernel, QAS before the optimiser."""
  scales = qas_lib.kernel_scales(params, bits)
  flat_scales = traverse_util.flatten_dict(scales, sep='/')
  trained_scales = {p: flat_scales.get(p) for p in paths}

  def wrap_loss(loss_fn):
    def loss_of_int(int_params, *args):
      return loss_fn(qas_lib.float_domain(int_params, scales), *args)
    return loss_of_int

  return TrainingDomain(
      optimizer=optax.chain(
          qas_lib.quantization_aware_scaling(trained_scales), optimizer),
      to_train=lambda p: qas_lib.integer_domain(p, scales, bits),
      to_model=lambda p: qas_lib.float_domain(p, scales),
      wrap_loss=wrap_loss)


def build(config: ml_collections.ConfigDict, params: PyTree,
          paths: Sequence[str], optimizer: optax.GradientTransformation
          ) -> TrainingDomain:
  """The optimiser form `config.optimizer_state` and `config.qas` select.

  Args:
    config: holds (optionally) `optimizer_state` and `qas`.
    params: the float params training starts from (QAS takes its scales).
    paths: the trainable leaves' paths.
    optimizer: the base optimiser (e.g. `ondevice.optim.build_optimizer`).
  """
  wrap_state = _selected(config, 'optimizer_state', STATE_FORMATS)
  bits = _selected(config, 'qas', QAS_MODES)
  if bits is None:
    return TrainingDomain(wrap_state(optimizer), _identity, _identity,
                          _identity)
  domain = _qas_domain(params, paths, optimizer, bits)
  return dataclasses.replace(domain, optimizer=wrap_state(domain.optimizer))
