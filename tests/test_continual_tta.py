"""Batch-norm adaptation and TENT on a tiny batch-norm MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from continual import tta
from ondevice import models
from ondevice import train


def _model(norm='batch'):
  model = models.build_model('mlp', 3, hidden=(6,), norm=norm)
  variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 4))))
  params = variables.pop('params')
  return model, params, variables


def test_bn_adaptation_mixes_source_and_target_statistics():
  model, params, state = _model()
  source = {'batch_stats': jax.tree.map(lambda s: s + 0.5,
                                        state['batch_stats'])}
  x = jax.random.normal(jax.random.key(1), (10, 4)) * 3.0 + 1.0
  # The norm's input is the first Dense layer's output.
  h = x @ params['hidden1']['kernel'] + params['hidden1']['bias']
  mean, var = np.mean(h, 0), np.var(h, 0)
  adapt = jax.jit(lambda x, n, m: tta.adapt_batch_norm(model, params, source,
                                                       x, n, m),
                  static_argnums=1)
  target = adapt(x, 0.0, jnp.ones(10))
  stats = target['batch_stats']['hidden1_norm']
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['var'], var, rtol=1e-4, atol=1e-5)
  # Schneider et al.: N / (N + n) of the source, here N = 30, n = 10.
  mixed = adapt(x, 30.0, jnp.ones(10))
  src = source['batch_stats']['hidden1_norm']
  np.testing.assert_allclose(mixed['batch_stats']['hidden1_norm']['mean'],
                             0.75 * src['mean'] + 0.25 * mean, rtol=1e-4,
                             atol=1e-5)
  # Padding rows are left out of the statistics.
  padded = jnp.concatenate([x[:7], 100.0 * jnp.ones((3, 4))])
  masked = adapt(padded, 0.0, jnp.array([1.0] * 7 + [0.0] * 3))
  h = h[:7]
  mean = np.mean(h, 0)
  np.testing.assert_allclose(masked['batch_stats']['hidden1_norm']['mean'],
                             mean, rtol=1e-4, atol=1e-4)


def test_tent_trains_only_norms_and_lowers_entropy():
  model, params, state = _model()
  paths = tta.norm_paths(params)
  assert paths == ('hidden1_norm/bias', 'hidden1_norm/scale')
  opt = optax.adam(0.05)
  st = train.state_from_params(params, state, opt, paths)
  step = jax.jit(tta.make_tent_step(model, opt, params))
  x = jax.random.normal(jax.random.key(2), (16, 4))
  batch = {'x': x, 'y': jnp.zeros(16, jnp.int32), 'mask': jnp.ones(16)}
  entropies = []
  for i in range(15):
    st, metrics = step(st, batch, jax.random.key(i))
    entropies.append(float(metrics['loss']))
  assert entropies[-1] < 0.8 * entropies[0]
  before = train.flatten_params(params)
  after = train.flatten_params(st.params)
  for path in before:
    changed = not np.array_equal(before[path], after[path])
    assert changed == (path in paths), path
  # Train-mode steps move the running statistics toward the test batches.
  assert not np.array_equal(st.model_state['batch_stats']['hidden1_norm']
                            ['mean'], state['batch_stats']['hidden1_norm']
                            ['mean'])


def test_entropy_by_hand_and_errors():
  # Uniform over 4 classes: ln 4; a one-hot-like row: ~0.
  ent = tta.entropy(jnp.array([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(ent, [np.log(4.0), 0.0], atol=1e-6)
  model, params, state = _model(norm='none')
  with pytest.raises(ValueError, match='norm'):
    tta.norm_paths(params)
  with pytest.raises(ValueError, match='batch_stats'):
    tta.adapt_batch_norm(model, params, state, jnp.zeros((2, 4)))
