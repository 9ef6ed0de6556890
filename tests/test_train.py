"""Tests of the pure train step: masks, frozen params, learning."""
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ondevice import train


class TwoLayer(nn.Module):
  """A 2-layer MLP written here so the test does not depend on the zoo."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Dense(16, name='hidden')(x))
    return nn.Dense(3, name='out')(x)


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
  return x, y


def _setup(trainable=None, opt=None):
  model = TwoLayer()
  opt = opt or optax.sgd(0.1, momentum=0.9)
  state = train.init_state(model, opt, jnp.zeros((1, 5)), jax.random.key(0),
                           trainable)
  paths = train.resolve_trainable(state.params, trainable)
  step = train.make_train_step(train.classification_loss(model), opt, paths)
  return model, state, jax.jit(step)


def test_padded_examples_change_nothing():
  _, state, step = _setup()
  x, y = _data(8)
  real = {'x': x, 'y': y, 'mask': np.ones(8, np.float32)}
  garbage_x = np.full((8, 5), 1e3, np.float32)  # Would dominate the loss.
  padded = {'x': np.concatenate([x, garbage_x]),
            'y': np.concatenate([y, np.full(8, 2, np.int32)]),
            'mask': np.concatenate([np.ones(8), np.zeros(8)]).astype(np.float32)}
  key = jax.random.key(1)
  s_real, m_real = step(state, real, key)
  s_pad, m_pad = step(state, padded, key)
  for a, b in zip(jax.tree.leaves(s_real.params), jax.tree.leaves(s_pad.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert float(m_pad['count']) == 8.0
  np.testing.assert_allclose(m_real['loss'], m_pad['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_real['correct'], m_pad['correct'])


def test_all_padding_batch_is_a_no_op_even_with_momentum():
  _, state, step = _setup()
  x, y = _data(8)
  full = {'x': x, 'y': y, 'mask': np.ones(8, np.float32)}
  state, _ = step(state, full, jax.random.key(0))  # Momentum is now non-zero.
  empty = dict(full, mask=np.zeros(8, np.float32))
  after, metrics = step(state, empty, jax.random.key(1))
  assert float(metrics['count']) == 0.0
  assert int(after.step) == int(state.step) == 1
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def _count_dots(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      count += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_dots(sub)
  return count


def test_frozen_weights_get_no_gradient_matmul():
  x, y = _data(4)
  batch = {'x': x, 'y': y, 'mask': np.ones(4, np.float32)}
  counts = {}
  for name, rule in [('full', None), ('bias', lambda p: p.endswith('bias'))]:
    _, state, step = _setup(trainable=rule)
    jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.key(0))
    counts[name] = _count_dots(jaxpr.jaxpr)
  # Full: 2 forward + 2 weight-gradient + 1 input-gradient (into `out`).
  # Bias-only: 2 forward + 1 input-gradient (needed for hidden/bias).
  assert counts == {'full': 5, 'bias': 3}


def test_frozen_leaves_stay_put_and_have_no_optimizer_state():
  rule = lambda p: p.startswith('out/')
  _, state, step = _setup(trainable=rule, opt=optax.adam(1e-2))
  x, y = _data(16)
  new, _ = step(state, {'x': x, 'y': y, 'mask': np.ones(16, np.float32)},
                jax.random.key(0))
  np.testing.assert_array_equal(new.params['hidden']['kernel'],
                                state.params['hidden']['kernel'])
  assert not np.array_equal(new.params['out']['kernel'],
                            state.params['out']['kernel'])
  adam_state = new.opt_state[0]
  assert sorted(adam_state.mu) == ['out/bias', 'out/kernel']


def test_unknown_trainable_path_is_an_error():
  params = {'out': {'kernel': jnp.zeros((2, 2))}}
  with pytest.raises(ValueError, match='not parameters'):
    train.resolve_trainable(params, ['out/kernal'])


def test_training_reduces_loss_and_step_compiles_once():
  _, state, step = _setup(opt=optax.adam(1e-2))
  x, y = _data(256)
  batch = {'x': x, 'y': y, 'mask': np.ones(256, np.float32)}
  first = None
  for i in range(100):
    state, metrics = step(state, batch, jax.random.key(i))
    first = float(metrics['loss']) if first is None else first
  # A 3-class problem starts near ln 3 = 1.10; the labels are a function of
  # two thresholds of x, which a 16-unit MLP fits well within 100 Adam steps.
  assert first > 0.9
  assert float(metrics['loss']) < 0.3
  assert step._cache_size() == 1


def test_evaluate_pads_the_last_batch():
  model, state, _ = _setup()
  x, y = _data(10)
  eval_step = jax.jit(train.make_eval_step(model))
  got = train.evaluate(eval_step, state.params, state.model_state, x, y, 4)
  logits = model.apply({'params': state.params}, x)
  want_acc = float(np.mean(np.argmax(logits, -1) == y))
  want_loss = float(np.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, y)))
  assert got['count'] == 10
  np.testing.assert_allclose(got['accuracy'], want_acc)
  np.testing.assert_allclose(got['loss'], want_loss, rtol=1e-5)


def test_padding_changes_nothing_with_batch_norm():
  # Batch statistics must ignore padded rows, or padding would leak into the
  # normalisation of the real examples and into the running averages.
  from ondevice import models
  model = models.build_model('mlp', 3, hidden=(8,), norm='batch')
  opt = optax.sgd(0.1)
  state = train.init_state(model, opt, jnp.zeros((1, 5)), jax.random.key(0))
  step = jax.jit(train.make_train_step(train.classification_loss(model), opt))
  x, y = _data(6)
  real = {'x': x, 'y': y, 'mask': np.ones(6, np.float32)}
  padded = {'x': np.concatenate([x, np.full((4, 5), 50.0, np.float32)]),
            'y': np.concatenate([y, np.zeros(4, np.int32)]),
            'mask': np.concatenate([np.ones(6), np.zeros(4)]).astype(
                np.float32)}
  a, _ = step(state, real, jax.random.key(1))
  b, _ = step(state, padded, jax.random.key(1))
  for u, v in zip(jax.tree.leaves((a.params, a.model_state)),
                  jax.tree.leaves((b.params, b.model_state))):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
