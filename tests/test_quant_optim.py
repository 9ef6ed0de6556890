"""Tests for QAS (quantized_training.qas) and int8 optimiser state."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ondevice import options
from ondevice import train
from quantized_training import optim_state as i8s
from quantized_training import optimizers
from quantized_training import qas


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 4)) *
                                      np.array([0.01, 0.1, 1.0, 3.0]),
                                      jnp.float32),
                'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
  }


def _loss(params, x):
  h = x @ params['dense']['kernel'] + params['dense']['bias']
  return jnp.sum(jnp.tanh(h) ** 2)


X = jnp.asarray(np.random.default_rng(1).normal(size=(8, 6)), jnp.float32)


def test_kernel_scales_are_per_output_channel_and_skip_biases():
  scales = jax.jit(qas.kernel_scales)(_params())
  assert scales['dense']['bias'] is None
  assert scales['dense']['kernel'].shape == (1, 4)
  k = _params()['dense']['kernel']
  np.testing.assert_allclose(scales['dense']['kernel'][0],
                             np.abs(k).max(0) / 127, rtol=1e-6)


def test_qas_makes_integer_domain_sgd_equal_float_sgd():
  lr = 0.05
  sgd = optax.sgd(lr)

  @jax.jit
  def run(params):
    scales = qas.kernel_scales(params)
    w_int = qas.integer_domain(params, scales)
    float_params = qas.float_domain(w_int, scales)  # the quantised model
    grads_int = jax.grad(
        lambda p: _loss(qas.float_domain(p, scales), X))(w_int)
    grads_float = jax.grad(_loss)(float_params, X)
    with_qas = optax.chain(qas.quantization_aware_scaling(scales), sgd)
    updates, _ = with_qas.update(grads_int, with_qas.init(w_int), w_int)
    stepped = qas.float_domain(optax.apply_updates(w_int, updates), scales)
    expected = optax.apply_updates(
        float_params, sgd.update(grads_float, sgd.init(float_params))[0])
    plain, _ = sgd.update(grads_int, sgd.init(w_int))
    return scales, grads_int, grads_float, stepped, expected, plain

  scales, grads_int, grads_float, stepped, expected, plain = run(_params())
  s = np.asarray(scales['dense']['kernel'])
  # Chain rule: the integer-domain gradient is s_W times the float one.
  np.testing.assert_allclose(grads_int['dense']['kernel'],
                             grads_float['dense']['kernel'] * s, rtol=1e-5)
  # With QAS, one integer-domain SGD step is exactly a float SGD step.
  for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Without QAS the kernel step is s_W**2 times too small, per channel.
  float_step = -lr * np.asarray(grads_float['dense']['kernel'])
  np.testing.assert_allclose(np.asarray(plain['dense']['kernel']) * s,
                             float_step * s**2, rtol=1e-5, atol=1e-12)


def test_qas_rejects_mismatched_scales():
  tx = qas.quantization_aware_scaling({'other': None})
  with pytest.raises(ValueError, match='kernel_scales'):
    jax.eval_shape(tx.update, _params(), tx.init(_params()))


def test_round_integer_params_snaps_to_grid_and_sr_is_unbiased():
  n = 2000

  @jax.jit
  def run(params, keys):
    scales = qas.kernel_scales(params)
    w_int = qas.integer_domain(params, scales)
    nudged = jax.tree.map(lambda a: a + 0.25, w_int)
    snapped = qas.round_integer_params(nudged, scales)
    mean = jax.vmap(lambda k: qas.round_integer_params(
        nudged, scales, key=k)['dense']['kernel'])(keys).mean(0)
    return w_int, nudged, snapped, mean

  w_int, nudged, snapped, mean = run(
      _params(), jax.random.split(jax.random.key(0), n))
  np.testing.assert_array_equal(snapped['dense']['kernel'],
                                w_int['dense']['kernel'])
  np.testing.assert_array_equal(snapped['dense']['bias'],
                                nudged['dense']['bias'])  # not quantised
  # +0.25 of a step: SR mean within 4 std errs (sqrt(0.25 * 0.75 / n)).
  codes = np.asarray(w_int['dense']['kernel'])
  err = np.where(np.abs(codes) < 127,
                 np.abs(np.asarray(mean) - (codes + 0.25)), 0.0)
  assert err.max() < 4 * np.sqrt(0.25 * 0.75 / n)


@functools.lru_cache(maxsize=None)
def _jitted(opt):

  def step(params, state):
    grads = jax.grad(_loss)(params, X)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(opt.init), jax.jit(step)


def _momentum_run(opt, steps=20):
  init, step = _jitted(opt)
  params = _params()
  state = init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_int8_momentum_state_tracks_float_and_is_smaller():
  float_opt = optax.sgd(0.01, momentum=0.9)
  int8_opt = i8s.int8_state(float_opt, min_size=4)
  p_float, s_float = _momentum_run(float_opt)
  p_int8, s_int8 = _momentum_run(int8_opt)
  trace = s_int8.inner[0].trace['dense']['kernel']
  assert isinstance(trace, i8s.QuantizedArray)
  assert trace.codes.dtype == jnp.int8 and trace.scale.shape == (1, 4)
  # Each step adds at most half a step of int8 rounding error per entry to
  # the momentum (|m| / 254 relative), so 20 steps stay within a few percent.
  for a, b in zip(jax.tree.leaves(p_int8), jax.tree.leaves(p_float)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=1e-3)
  ratio = i8s.state_bytes(s_int8) / i8s.state_bytes(s_float)
  assert ratio < 0.5  # int8 codes + one float scale per channel vs float32


def test_int8_state_with_stochastic_rounding_is_reproducible_and_vmaps():
  opt = i8s.int8_state(optax.sgd(0.01, momentum=0.9), min_size=4,
                       stochastic_rounding=True, seed=3)
  a, _ = _momentum_run(opt, steps=5)
  b, _ = _momentum_run(opt, steps=5)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  stacked = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), _params())

  @jax.jit
  def client_steps(stacked):
    states = jax.vmap(opt.init)(stacked)
    grads = jax.vmap(jax.grad(_loss), (0, None))(stacked, X)
    return jax.vmap(opt.update)(grads, states, stacked)[0]

  updates = client_steps(stacked)
  assert updates['dense']['kernel'].shape == (2, 6, 4)


def test_keep_float_leaves_selected_leaves_alone():
  opt = i8s.int8_state(optax.adam(1e-2), min_size=4,
                       keep_float=lambda path, leaf: 'nu' in str(path))
  state = jax.eval_shape(opt.init, _params())
  adam_state = state.inner[0]
  assert isinstance(adam_state.mu['dense']['kernel'], i8s.QuantizedArray)
  assert adam_state.nu['dense']['kernel'].dtype == jnp.float32


def test_config_selected_qas_domain_steps_like_float_sgd_on_the_grid():
  # optimizers.build wires QAS as train.make_train_step sees it: a flat
  # {path: leaf} dict of the trainable leaves, here the kernel only.
  config = ml_collections.ConfigDict()
  config.qas = options.named(optimizers.QAS_MODES, 'qas')
  params = _params()
  scales = qas.kernel_scales(params)
  on_grid = qas.float_domain(qas.integer_domain(params, scales), scales)
  sgd = optax.sgd(0.05)
  paths = ('dense/kernel',)
  domain = optimizers.build(config, on_grid, paths, sgd)
  loss = lambda p, *args: _loss(p, X)
  step = train.make_train_step(
      lambda p, ms, b, r: (domain.wrap_loss(loss)(p), ({'count': jnp.ones(())}, ms)),
      domain.optimizer, paths)
  state = train.state_from_params(domain.to_train(on_grid), {},
                                  domain.optimizer, paths)
  new, _ = step(state, {}, None)
  float_step = train.make_train_step(
      lambda p, ms, b, r: (loss(p), ({'count': jnp.ones(())}, ms)), sgd, paths)
  expected, _ = float_step(train.state_from_params(on_grid, {}, sgd, paths),
                           {}, None)
  for a, b in zip(jax.tree.leaves(domain.to_model(new.params)),
                  jax.tree.leaves(expected.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The kernel trained in the integer domain: its values are codes / steps
  # of size lr * s**-1 * G, far larger than the float weights.
  assert (np.abs(new.params['dense']['kernel']).max() >
          10 * np.abs(expected.params['dense']['kernel']).max())


@pytest.mark.parametrize('name', ['float', 'int8'])
def test_config_selected_optimizer_state(name):
  config = ml_collections.ConfigDict()
  config.optimizer_state = options.named(optimizers.STATE_FORMATS, name)
  config.optimizer_state.int8.min_size = 4
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones((3,))}
  domain = optimizers.build(config, params, ('b', 'w'), optax.adam(0.1))
  state = domain.optimizer.init(params)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(state)}
  assert ('int8' in dtypes) == (name == 'int8')
  updates, _ = domain.optimizer.update(params, state, params)
  # Adam's first step moves every leaf by lr (times the sign of the grad).
  for u in jax.tree.leaves(updates):
    np.testing.assert_allclose(u, -0.1, rtol=1e-2)


def test_bad_optimizer_state_bits_name_the_key():
  config = ml_collections.ConfigDict()
  config.optimizer_state = options.named(optimizers.STATE_FORMATS, 'int8')
  config.optimizer_state.int8.bits = 1
  with pytest.raises(ValueError, match='config.optimizer_state.int8'):
    optimizers.validate(config)
  config.optimizer_state.name = 'int4'
  with pytest.raises(ValueError, match=r"config.optimizer_state.name.*\['float', 'int8'\]"):
    optimizers.validate(config)
