"""Quantised convs through the fast CPU forms (impl='cpu_friendly').

The fast forms (shifted-sum depthwise, im2col matmul) must compute the same
quantised convolution as the lax reference: same codes, scales and dither, so
values and both gradients agree up to float32 summation order.
"""
import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import quantized_training as qt
from ondevice import models
from quantized_training import config as qconfig
from quantized_training.int8_conv import int8_conv_general_dilated

NHWC = ('NHWC', 'HWIO', 'NHWC')
_SIM_SR = qconfig.uniform(8, stochastic_rounding=True)


def _normal(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# (input shape, kernel shape, feature groups, strides, padding)
_CASES = {
    'depthwise_strided': ((2, 9, 7, 6), (3, 3, 1, 6), 6, (2, 2), 'SAME'),
    # The DS-CNN's first layer: 10x4 kernel, one input channel, stride 4.
    'first_layer': ((2, 24, 12, 1), (10, 4, 1, 8), 1, (4, 4), 'SAME'),
    'dense_explicit_pad': ((2, 7, 6, 3), (3, 2, 3, 5), 1, (2, 1),
                           ((1, 0), (0, 1))),
}


@pytest.mark.parametrize('case', sorted(_CASES))
def test_fast_form_matches_lax_reference_within_rounding(case):
  xs, ws, groups, strides, padding = _CASES[case]
  x, w = _normal(xs, 0), _normal(ws, 1)

  @jax.jit
  def values_and_grads(x, w):
    out = {}
    for impl in ('lax', 'cpu_friendly'):
      def f(x, w, impl=impl):
        y = int8_conv_general_dilated(
            x, w, strides, padding, dimension_numbers=NHWC,
            feature_group_count=groups, config=_SIM_SR,
            key=jax.random.key(3), impl=impl)
        return jnp.sum(jnp.sin(y)), y
      (_, y), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(x, w)
      out[impl] = (y,) + grads
    return out

  out = values_and_grads(x, w)
  # Products of int8 codes summed in float32 are exact below 2**24, so the
  # only difference allowed is float32 rounding of the rescaled results.
  for ref, fast in zip(out['lax'], out['cpu_friendly']):
    np.testing.assert_allclose(fast, ref, rtol=1e-5,
                               atol=1e-5 * float(np.abs(ref).max()))
  # The quantised conv is not the float conv: it differs by about one code.
  y_float = lax.conv_general_dilated(x, w, strides, padding,
                                     dimension_numbers=NHWC,
                                     feature_group_count=groups)
  assert 0 < np.abs(out['cpu_friendly'][0] - y_float).max()


def _conv_and_dot_eqns(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      found.append(eqn)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      found += _conv_and_dot_eqns(sub)
  return found


def _dscnn_grad_jaxpr(quant):
  spec = qt.get_quant(quant)
  model = models.build_model('ds_cnn_s', 5, channels=8, norm='none',
                             first_kernel=(4, 3), first_stride=(2, 2),
                             block_strides=((1, 1), (2, 2)),
                             **spec.model_kwargs())
  x = jnp.zeros((2, 12, 8))
  # Shapes suffice for make_jaxpr; eager init would compile op by op.
  params = jax.eval_shape(model.init, jax.random.key(0), x)['params']

  def loss(params):
    logits = model.apply({'params': params}, x, rngs={'quant':
                                                      jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.zeros((2,), jnp.int32)).mean()

  return jax.make_jaxpr(jax.grad(loss))(params).jaxpr


def test_quantised_dscnn_uses_fast_forms_on_simulated_path():
  eqns = _conv_and_dot_eqns(_dscnn_grad_jaxpr('int8_fwd_bwd_sr'))
  convs = [e for e in eqns if e.primitive.name == 'conv_general_dilated']
  dots = [e for e in eqns if e.primitive.name == 'dot_general']
  # No convolution primitive is left: depthwise convs became shifted sums
  # and conv0 an im2col matmul whose patches are strided slices.
  assert not convs
  # Matmuls, 3 per layer (forward, input grad, weight grad): conv0 as
  # im2col, 2 pointwise convs, the classifier.
  assert len(dots) == 3 * (1 + 2 + 1)
  assert all(e.params['preferred_element_type'] == jnp.float32
             for e in dots)


def test_quantised_dscnn_has_int8_matmuls_on_integer_path():
  eqns = _conv_and_dot_eqns(_dscnn_grad_jaxpr('int8_fwd_bwd_sr_int'))
  int8 = [e.primitive.name for e in eqns
          if all(v.aval.dtype == jnp.int8 for v in e.invars)]
  # conv0 and 2 depthwise convs stay lax convs on this path; 2 pointwise
  # layers and the classifier are dots; three int8 matmuls each.
  assert int8.count('conv_general_dilated') == 3 * 3
  assert int8.count('dot_general') == 3 * 3


def test_registry_picks_impl_and_rejects_fast_integer_path():
  assert qt.get_quant('int8_fwd_bwd_sr').conv_impl == 'cpu_friendly'
  assert qt.get_quant('int8_fwd').conv_impl == 'cpu_friendly'
  assert qt.get_quant('int8_fwd_bwd_sr_int').conv_impl == 'lax'
  x, w = _normal((1, 4, 4, 2), 0), _normal((3, 3, 2, 2), 1)
  conv = functools.partial(int8_conv_general_dilated, window_strides=(1, 1),
                           padding='SAME', dimension_numbers=NHWC)
  with pytest.raises(ValueError, match='use_int'):
    conv(x, w, config=qconfig.uniform(8, use_int=True), impl='cpu_friendly')
  with pytest.raises(ValueError, match='impl must be one of'):
    conv(x, w, impl='fast')
