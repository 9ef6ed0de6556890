"""Every quant mode builds every model, and the hooks reach every layer.

One set of keyword arguments, `get_quant(name).model_kwargs()`, must build
any model of `ondevice.models` (the embedding model included) and quantise
all of its matmuls.
"""
from __future__ import annotations

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ondevice import models
from ondevice import train
import quantized_training as qt

# Small shapes: a DS-CNN on a 12x8 "spectrogram", images of 28x28x1.
_SMALL_DSCNN = dict(channels=8, first_kernel=(4, 3), first_stride=(2, 2),
                    block_strides=((1, 1), (2, 2)))
_SPEECH = (2, 12, 8)
_IMAGE = (2, 28, 28, 1)


def _input_shape(name):
  return _SPEECH if name.startswith('ds_cnn') else _IMAGE


def test_model_kwargs_are_the_hooks_every_model_accepts():
  for quant in qt.QUANT_NAMES:
    assert set(qt.get_quant(quant).model_kwargs()) <= set(models.QUANT_HOOKS)


# One registered name per model class (the other names are field presets).
_ONE_PER_CLASS = ('ds_cnn_s', 'cnn', 'mlp')


@pytest.mark.parametrize('quant', qt.QUANT_NAMES)
def test_every_quant_mode_builds_every_model(quant):
  kwargs = qt.get_quant(quant).model_kwargs()
  for name in _ONE_PER_CLASS:
    extra = _SMALL_DSCNN if name.startswith('ds_cnn') else {}
    for model, width in ((models.build_model(name, 3, **extra, **kwargs), 3),
                         (models.build_embedding_model(name, 4, **extra,
                                                       **kwargs), 4)):
      x = jax.ShapeDtypeStruct(_input_shape(name), jnp.float32)
      variables = jax.eval_shape(model.init, jax.random.key(0), x)
      out = jax.eval_shape(
          lambda v, x, m=model: m.apply(v, x, rngs={'quant':
                                                    jax.random.key(1)}),
          variables, x)
      assert out.shape == (2, width), (quant, name)


def _classifier_step(model, shape):
  optimizer = optax.sgd(0.1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  # A jitted init: eager init would compile op by op.
  variables = dict(jax.jit(model.init)(jax.random.key(0), x))
  params = variables.pop('params')
  state = train.state_from_params(params, variables, optimizer)
  step = jax.jit(train.make_train_step(train.classification_loss(model),
                                       optimizer))
  batch = {'x': x, 'y': jnp.array([0, 1]), 'mask': jnp.ones(2)}
  new, metrics = step(state, batch, jax.random.key(1))
  return state, new, metrics


@pytest.mark.parametrize('quant,name', [
    *[(q, 'embedding') for q in qt.QUANT_NAMES],
    ('int8_fwd_bwd_sr', 'cnn_2k'), ('int8_fwd_bwd_sr', 'mlp_2k')])
def test_every_quant_mode_takes_a_step(quant, name):
  # Every mode on the embedding model (an MLP backbone under the embedding
  # head, trained as a 2-way classifier of its embedding), and one int8 mode
  # on the image classifiers; DS-CNN steps in every mode are costly to
  # compile, and its conv paths are exercised by test_quant_fast_convs and
  # test_quant_train (the build test above covers it in every mode).
  kwargs = qt.get_quant(quant).model_kwargs()
  if name == 'embedding':
    model = models.build_embedding_model('mlp', 2, hidden=(8,), **kwargs)
  else:
    extra = _SMALL_DSCNN if name.startswith('ds_cnn') else {}
    model = models.build_model(name, 2, **extra, **kwargs)
  shape = _input_shape(name)
  state, new, metrics = _classifier_step(model, shape)
  assert np.isfinite(float(metrics['loss']))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params,
                       new.params)
  assert all(jax.tree.leaves(moved)), (quant, name, moved)


def _int8_dots(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general' and all(
        v.aval.dtype == jnp.int8 for v in eqn.invars):
      count += 1
    for sub in jex_core.jaxprs_in_params(eqn.params):
      count += _int8_dots(sub)
  return count


def test_quantised_embedding_model_has_int8_dense_layers():
  spec = qt.get_quant('int8_fwd_bwd_sr_int')  # The int8 x int8 path.
  model = models.build_embedding_model('mlp', 4, hidden=(8,),
                                       **spec.model_kwargs())
  x = jnp.ones(_IMAGE)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda v: model.apply(
      v, x, rngs={'quant': jax.random.key(1)}))(variables).jaxpr
  # backbone/hidden1 and head/projection: both Dense layers in int8.
  assert _int8_dots(jaxpr) == 2
  float_model = models.build_embedding_model('mlp', 4, hidden=(8,))
  float_jaxpr = jax.make_jaxpr(lambda v: float_model.apply(v, x))(
      variables).jaxpr
  assert _int8_dots(float_jaxpr) == 0
