"""The sparse train step differentiates only what trains; compact ReLUs.

Expected counts of matrix products (convolutions and dot_generals) in the
step, derived from what reverse mode needs. DS-CNN-S is built with lax's
convolution injected (ondevice.models otherwise rewrites convolutions into
CPU-friendly forms), so its forward pass has F = 10 products: conv0, 4
depthwise convolutions, 4 pointwise ones (Dense layers over pixels) and the
classifier, conv0 first:
  a trainable kernel          +1 product: its weight gradient.
  a product after the first   +1 product: its input gradient, needed
  trainable leaf              to reach that leaf. conv0's input is the data,
                              which is never differentiated.
So full: 3F - 1; bias-only with the head: F + (F - 1) + 1 = 2F; bias-only
without it: 2F - 1; classifier only: F + 1; last 2 layers (pw4 and the
classifier): F + 2 (their weight gradients) + 1 (the classifier's input
gradient, to reach pw4).
"""
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np
import optax
import pytest

from ondevice import models
from ondevice import train
from sparse_updates import compact_relu
from sparse_updates import presets
from sparse_updates import rules

OPS = ('conv_general_dilated', 'dot_general')


def _count(jaxpr, counts):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in OPS:
      counts[eqn.primitive.name] += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          _count(sub.jaxpr, counts)
        elif isinstance(sub, jex_core.Jaxpr):
          _count(sub, counts)
  return counts


@pytest.fixture(scope='module')
def dscnn():
  model = models.build_model('ds_cnn_s', 12, norm='none',
                             conv_general_dilated=jax.lax.conv_general_dilated)
  x = jnp.zeros((2, 98, 40))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])['params']
  # NumPy initialisation: no compilation, and values do not matter here.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  batch = {'x': x, 'y': jnp.zeros(2, jnp.int32), 'mask': jnp.ones(2)}
  return model, params, batch


@pytest.mark.parametrize('scheme,kwargs,expected', [
    ('full', {}, lambda f: 3 * f - 1),
    ('bias_only', {}, lambda f: 2 * f),
    ('bias_only', {'head': False}, lambda f: 2 * f - 1),
    ('classifier_only', {}, lambda f: f + 1),
    ('last_k', {'k': 2}, lambda f: f + 3),
])
def test_step_forms_only_the_gradients_it_needs(dscnn, scheme, kwargs,
                                                expected):
  model, params, batch = dscnn
  forward = _count(jax.make_jaxpr(model.apply)({'params': params},
                                               batch['x']).jaxpr,
                   {op: 0 for op in OPS})
  f = sum(forward.values())
  assert forward == {'conv_general_dilated': 5, 'dot_general': 5}
  order = presets.forward_order(model, {'params': params}, batch['x'])
  if scheme == 'last_k':
    kwargs = dict(kwargs, layer_order=order)
  paths = rules.trainable_paths(
      params, presets.get_rules(scheme, params, **kwargs))
  opt = optax.adam(1e-3)
  state = train.state_from_params(params, {}, opt, paths)
  step = train.make_train_step(train.classification_loss(model), opt, paths)
  jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr
  counts = _count(jaxpr, {op: 0 for op in OPS})
  assert sum(counts.values()) == expected(f), counts
  # Optimiser state: Adam's two moments, for the trainable leaves only.
  mu = state.opt_state[0].mu
  assert sorted(mu) == sorted(paths)


def test_compact_relu_keeps_values_and_gradients(dscnn):
  model, params, batch = dscnn
  loss_fn = train.classification_loss(model)
  assert compact_relu.count_relus(loss_fn, params, {}, batch,
                                  jax.random.key(0)) == 9
  # A 1-block DS-CNN on small inputs keeps the compilation short.
  model = models.build_model('ds_cnn_s', 12, norm='none', channels=8,
                             block_strides=((1, 1),))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 20, 8)).astype(np.float32)
  params = jax.tree.map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
      jax.eval_shape(model.init, jax.random.key(0), x)['params'])
  batch = {'x': x, 'y': np.array([3, 7]), 'mask': np.ones(2, np.float32)}
  loss_fn = train.classification_loss(model)
  compact = compact_relu.with_compact_relu(loss_fn)
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(
      lambda p: f(p, {}, batch, None)[0]))(params)
  (got, got_grads), (want, want_grads) = (value_and_grad(compact),
                                          value_and_grad(loss_fn))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_packed_relu_bits_round_trip_and_zero_has_zero_gradient():
  x = jnp.array([[-1.0, 0.0, 2.0], [3.0, -0.5, 0.25], [0.0, 1.0, -2.0]])
  bits = compact_relu.pack_signs(x)
  assert bits.shape == (2,) and bits.dtype == jnp.uint8  # 9 bits -> 2 B.
  np.testing.assert_array_equal(compact_relu.unpack_signs(bits, x.shape),
                                x > 0)
  g = jax.jit(jax.grad(
      lambda v: jnp.sum(compact_relu.packed_relu(v) * 2.0)))(x)
  np.testing.assert_array_equal(g, jnp.where(x > 0, 2.0, 0.0))


def test_compact_step_vmaps_over_clients_and_compiles_once():
  model = models.build_model('mlp', 3, hidden=(8,))
  opt = optax.sgd(0.1)
  x = np.random.default_rng(0).normal(size=(2, 4, 5)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x[0, :1])['params']
  state = train.state_from_params(params, {}, opt)
  loss = compact_relu.with_compact_relu(train.classification_loss(model))
  step = train.make_train_step(loss, opt)
  one_client = jax.jit(step)
  batch = {'x': x, 'y': np.zeros((2, 4), np.int32),
           'mask': np.ones((2, 4), np.float32)}
  # Device arrays, as the step returns them, so that one compilation serves.
  states = jax.device_put(jax.tree.map(lambda a: np.stack([a, a]), state))
  keys = jax.random.split(jax.random.key(1), 2)
  cohort = jax.jit(jax.vmap(step))
  new, _ = cohort(states, batch, keys)
  for c in range(2):
    one, _ = one_client(jax.tree.map(lambda a: a[c], states),
                  jax.tree.map(lambda a: a[c], batch), keys[c])
    for a, b in zip(jax.tree.leaves(one.params),
                    jax.tree.leaves(new.params)):
      np.testing.assert_allclose(a, np.asarray(b)[c], rtol=1e-5, atol=1e-7)
  # Guard: feeding the step its own outputs does not recompile it.
  cohort(new, batch, keys)
  assert cohort._cache_size() == 1  # pylint: disable=protected-access
