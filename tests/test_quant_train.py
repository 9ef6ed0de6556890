"""End-to-end tests: quant modes by name, flax injection, training, vmap."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import quantized_training as qt

N_CLASSES = 4


class MLP(nn.Module):
  """A two-layer MLP whose matmuls are injected, as the models' are."""
  dot_general_cls: object = None
  conv_general_dilated_cls: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, dot_general_cls=self.dot_general_cls)(x))
    return nn.Dense(N_CLASSES, dot_general_cls=self.dot_general_cls)(x)


class TinyDSCNN(nn.Module):
  """Strided conv, depthwise conv, pooled classifier (a DS-CNN in small)."""
  dot_general_cls: object = None
  conv_general_dilated_cls: object = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(
        nn.Conv, conv_general_dilated_cls=self.conv_general_dilated_cls)
    x = nn.relu(conv(8, (3, 3), strides=2)(x))
    x = nn.relu(conv(8, (3, 3), feature_group_count=8)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(N_CLASSES, dot_general_cls=self.dot_general_cls)(x)


def _task(n=256, dim=16, seed=0):
  """Four Gaussian clusters; labels from the nearest centre."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(N_CLASSES, dim)) * 1.5
  y = rng.integers(0, N_CLASSES, size=n)
  x = centres[y] + rng.normal(size=(n, dim))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def _make_step(model, spec, lr=0.1):
  def loss_fn(params, x, y, key):
    rngs = {'quant': key} if spec.needs_rng else {}
    logits = model.apply({'params': params}, x, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

  return step


@functools.lru_cache(maxsize=None)
def _init(model_cls, input_shape):
  """LeCun-normal params, drawn in numpy (compiling flax init is slower).

  Quantised layers own no params, so one init serves every mode.
  """
  x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)
  shapes = jax.eval_shape(model_cls().init, jax.random.key(0), x)['params']
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['bias']"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in),
                       leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _jitted_step(name, model_cls, lr=0.1):
  spec = qt.get_quant(name)
  return jax.jit(_make_step(model_cls(**spec.model_kwargs()), spec, lr))


def _train(name, model_cls, x, y, steps, lr=0.1):
  params = _init(model_cls, x.shape[1:])
  step = _jitted_step(name, model_cls, lr)
  losses = []
  for i in range(steps):
    params, loss = step(params, x, y, jax.random.key(100 + i))
    losses.append(float(loss))
  return params, np.asarray(losses)


def test_get_quant_names_and_unknown_name():
  assert 'none' in qt.QUANT_NAMES and 'int8_fwd_bwd_sr' in qt.QUANT_NAMES
  none = qt.get_quant('none')
  assert none.dot_general_cls is None and not none.needs_rng
  assert none.model_kwargs() == {'dot_general_cls': None,
                                 'conv_general_dilated_cls': None}
  sr = qt.get_quant('int8_fwd_bwd_sr')
  assert sr.needs_rng and sr.config.dlhs.stochastic_rounding
  assert not qt.get_quant('int8_fwd_bwd').needs_rng
  assert qt.get_quant('int8_fwd_bwd_fgrad').config.drhs.bits is None
  assert qt.get_quant('int8_fwd_bwd_sr_int').config.fwd.use_int
  with pytest.raises(ValueError, match='int8_fwd_bwd_sr'):
    qt.get_quant('int4')
  with pytest.raises(ValueError, match='key='):
    sr.functional_kwargs()
  dense = nn.Dense(4, **{'dot_general': sr.functional_kwargs(
      jax.random.key(0))['dot_general']})
  apply = jax.jit(lambda p, x: dense.apply({'params': p}, x))
  assert apply(_init(MLP, (16,))['Dense_1'], jnp.ones((2, 32))).shape == (2, 4)


def test_flax_layers_own_no_params_and_draw_keys_per_layer():
  spec = qt.get_quant('int8_fwd_bwd_sr')
  model = MLP(**spec.model_kwargs())
  x = jnp.ones((2, 16))
  params = _init(MLP, (16,))
  assert set(params) == {'Dense_0', 'Dense_1'}
  assert set(params['Dense_0']) == {'bias', 'kernel'}
  # Forward without the 'quant' stream (evaluation) works: no key needed.
  evaluate = jax.jit(lambda p, x: model.apply({'params': p}, x))
  train_fwd = jax.jit(lambda p, x, k: model.apply({'params': p}, x,
                                                  rngs={'quant': k}))
  np.testing.assert_allclose(evaluate(params, x),
                             train_fwd(params, x, jax.random.key(1)))


def test_int8_training_reduces_loss_like_float():
  x, y = _task()
  steps = 60
  _, float_losses = _train('none', MLP, x, y, steps)
  _, q_losses = _train('int8_fwd_bwd_sr', MLP, x, y, steps)
  # Same init and data: the int8 run must make (almost) the same progress.
  # Loss starts near log(4) ~ 1.4; float ends well below 0.2 of that.
  assert float_losses[-1] < 0.2 * float_losses[0]
  assert q_losses[-1] < 0.2 * q_losses[0]
  # Progress within 10% of float's (1 - final / initial) reduction.
  f_red = 1 - float_losses[-1] / float_losses[0]
  q_red = 1 - q_losses[-1] / q_losses[0]
  assert abs(f_red - q_red) < 0.1 * f_red
  np.testing.assert_allclose(q_losses[:3], float_losses[:3], rtol=0.05)


def test_conv_model_with_depthwise_trains_in_int8():
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.integers(0, N_CLASSES, size=64))
  # Class-dependent mean pattern plus noise, on a 12x10 "spectrogram".
  patterns = rng.normal(size=(N_CLASSES, 12, 10, 1))
  x = jnp.asarray(patterns[np.asarray(y)] +
                  0.5 * rng.normal(size=(64, 12, 10, 1)), jnp.float32)
  _, float_losses = _train('none', TinyDSCNN, x, y, 40, lr=0.3)
  _, q_losses = _train('int8_fwd_bwd_sr', TinyDSCNN, x, y, 40, lr=0.3)
  # Float loses ~28% of its initial loss in 40 steps; int8 must track it:
  # its relative reduction (mean of the last 5 steps) within 10% of float's.
  f_red = 1 - float_losses[-5:].mean() / float_losses[0]
  q_red = 1 - q_losses[-5:].mean() / q_losses[0]
  assert f_red > 0.2
  assert abs(f_red - q_red) < 0.1 * f_red


def test_vmap_over_stacked_client_params_matches_loop():
  n_clients = 2
  data = [_task(seed=c) for c in range(n_clients)]  # one dataset per client
  xs = jnp.stack([x for x, _ in data])
  ys = jnp.stack([y for _, y in data])
  spec = qt.get_quant('int8_fwd_bwd_sr')
  step = _make_step(MLP(**spec.model_kwargs()), spec)
  # Different params per client: the shared init plus client-specific noise.
  noise = np.random.default_rng(3).normal
  params = jax.tree.map(
      lambda p: p + 0.1 * noise(size=(n_clients,) + p.shape).astype(p.dtype),
      _init(MLP, (16,)))
  keys = jax.random.split(jax.random.key(9), n_clients)
  batched, batched_loss = jax.jit(jax.vmap(step))(params, xs, ys, keys)
  # The reference: one client at a time (the step the training test jits).
  single = _jitted_step('int8_fwd_bwd_sr', MLP)
  params, batched = jax.tree.map(np.asarray, (params, batched))
  key_data = jax.random.key_data(keys)
  for c in range(n_clients):
    take = lambda tree: jax.tree.map(lambda a: a[c], tree)  # pylint: disable=cell-var-from-loop
    key_c = jax.random.wrap_key_data(key_data[c])
    new_c, loss_c = single(take(params), data[c][0], data[c][1], key_c)
    np.testing.assert_allclose(batched_loss[c], loss_c, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_c), jax.tree.leaves(take(batched))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_same_key_reproduces_training_and_no_recompile():
  x, y = _task()
  params = _init(MLP, (16,))
  step = _jitted_step('int8_fwd_bwd_sr', MLP)  # compiled by the tests above
  a, _ = step(params, x, y, jax.random.key(1))
  compiled = step._cache_size()  # pylint: disable=protected-access
  b, _ = step(params, x, y, jax.random.key(1))
  c, _ = step(params, x, y, jax.random.key(2))
  assert step._cache_size() == compiled  # pylint: disable=protected-access
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  assert any(np.any(np.asarray(u) != np.asarray(v)) for u, v in
             zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_missing_quant_rng_in_training_says_how_to_fix():
  model = MLP(**qt.get_quant('int8_fwd_bwd_sr').model_kwargs())
  x = jnp.ones((2, 16))
  params = _init(MLP, (16,))
  with pytest.raises(ValueError, match="rngs={'quant'"):
    jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x))))(params)
