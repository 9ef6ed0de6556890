"""Tests of fedjax_ext.client: on-device batches, padded steps, deltas."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_ext import client
from fedjax_ext import execution
from ondevice import train


class Linear(nn.Module):
  """Softmax regression, written here to keep compiles small."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(3, name='out')(x)


def _params():
  return Linear().init(jax.random.key(0), jnp.zeros((1, 4)))['params']


def _client(n, max_examples, seed=0):
  rng = np.random.default_rng(seed)
  x = np.zeros((max_examples, 4), np.float32)
  y = np.zeros(max_examples, np.int32)
  x[:n] = rng.normal(size=(n, 4))
  y[:n] = rng.integers(0, 3, n)
  mask = (np.arange(max_examples) < n).astype(np.float32)
  return {'x': x, 'y': y, 'mask': mask}


_LOSS = train.classification_loss(Linear())


def _update(local, wrapper=None):
  return jax.jit(client.make_client_update(_LOSS, optax.sgd(0.5), local,
                                           wrapper))


# Shared by several tests (a new jit compiles again): 5 steps of B = 2.
_FIVE_STEPS = client.LocalConfig(batch_size=2, num_steps=5)
_FIVE_STEP_UPDATE = _update(_FIVE_STEPS)


def test_local_batches_visit_each_valid_example_once_per_epoch():
  data = {'x': jnp.arange(8.0), 'y': jnp.arange(8),
          'mask': jnp.array([1, 1, 0, 1, 1, 0, 1, 0], jnp.float32)}
  valid = {0, 1, 3, 4, 6}
  batch_at = jax.jit(client.local_batch, static_argnums=(3, 4))
  for epoch in range(2):
    seen = []
    for b in range(3):  # ceil(5 / 2) batches per epoch.
      batch = batch_at(data, jax.random.key(3), jnp.asarray(3 * epoch + b),
                       2, None)
      seen += np.asarray(batch['y'])[np.asarray(batch['mask']) > 0].tolist()
    assert sorted(seen) == sorted(valid)
  # Past num_epochs every batch is padding.
  late = batch_at(data, jax.random.key(3), jnp.asarray(6), 2, 2)
  np.testing.assert_array_equal(late['mask'], 0.0)


def test_padded_steps_are_no_ops():
  # 3 real examples padded to 8, full-batch (B=4), 2 epochs: the scan has
  # 2 * ceil(8 / 4) = 4 steps, of which 2 are real. Full-batch SGD does not
  # depend on the order, so the reference is 2 plain steps on the 3 examples.
  data = _client(3, 8)
  params = _params()
  out = _update(client.LocalConfig(batch_size=4, num_epochs=2))(
      params, {}, data, jax.random.key(1))
  assert float(out.metrics['num_steps']) == 2.0
  assert float(out.metrics['count']) == 6.0
  assert float(out.weight) == 3.0

  opt = optax.sgd(0.5)
  step = jax.jit(train.make_train_step(train.classification_loss(Linear()),
                                      opt))
  state = train.state_from_params(params, {}, opt)
  real = {k: v[:3] for k, v in data.items()}
  for i in range(2):
    state, _ = step(state, real, jax.random.key(i))
  expected = train.flatten_params(state.params)
  before = train.flatten_params(params)
  for k in expected:
    np.testing.assert_allclose(out.delta[k], expected[k] - before[k],
                               rtol=1e-5, atol=1e-6)


def test_num_steps_cycles_through_epochs():
  # n=3, B=2: epochs are batches of 2 and 1, so 5 steps see 2+1+2+1+2.
  out = _FIVE_STEP_UPDATE(_params(), {}, _client(3, 6), jax.random.key(0))
  assert float(out.metrics['num_steps']) == 5.0
  assert float(out.metrics['count']) == 8.0
  # Both limits: 1 epoch ends after 2 steps.
  out = _update(client.LocalConfig(batch_size=2, num_steps=5, num_epochs=1))(
      _params(), {}, _client(3, 6), jax.random.key(0))
  assert float(out.metrics['num_steps']) == 2.0


def test_delta_covers_only_trainable_leaves():
  local = client.LocalConfig(batch_size=4, num_steps=3,
                             trainable=('out/bias',))
  out = _update(local)(_params(), {}, _client(5, 8), jax.random.key(0))
  assert set(out.delta) == {'out/bias'}
  assert float(jnp.abs(out.delta['out/bias']).sum()) > 0
  assert float(out.weight) == 5.0


def test_client_without_data_sends_a_zero_update():
  out = _FIVE_STEP_UPDATE(_params(), {}, _client(0, 6), jax.random.key(0))
  assert float(out.weight) == 0.0 and float(out.metrics['num_steps']) == 0.0
  for d in out.delta.values():
    np.testing.assert_array_equal(d, 0.0)


def test_proximal_term_follows_fedprox():
  # Two full-batch SGD steps on loss + mu/2 ||w - w0||^2, by hand:
  # w1 = w0 - lr g(w0) (the term's gradient is 0 at w0), then
  # w2 = w1 - lr (g(w1) + mu (w1 - w0)).
  lr, mu = 0.5, 0.7
  data = _client(3, 4)
  params = _params()
  out = _update(client.LocalConfig(batch_size=4, num_steps=2),
                client.proximal_wrapper(mu))(params, {}, data,
                                             jax.random.key(0))
  real = {k: v[:3] for k, v in data.items()}
  grad = jax.grad(lambda p: _LOSS(p, {}, real, None)[0])
  w0 = params
  w1 = jax.tree.map(lambda w, g: w - lr * g, w0, grad(w0))
  w2 = jax.tree.map(lambda a, g, b: a - lr * (g + mu * (a - b)), w1,
                    grad(w1), w0)
  expected = train.flatten_params(jax.tree.map(jnp.subtract, w2, w0))
  for k, v in expected.items():
    np.testing.assert_allclose(out.delta[k], v, rtol=1e-5, atol=1e-6)


def test_bad_local_configs_are_errors():
  with pytest.raises(ValueError, match='needs num_steps or num_epochs'):
    client.LocalConfig(batch_size=4)
  with pytest.raises(ValueError, match='batch_size must be >= 1'):
    client.LocalConfig(batch_size=0, num_steps=1)
  with pytest.raises(ValueError, match='num_epochs must be >= 1'):
    client.LocalConfig(batch_size=2, num_epochs=0)
  with pytest.raises(ValueError, match="loop must be one of"):
    client.LocalConfig(batch_size=2, num_steps=1, loop='python')
  with pytest.raises(ValueError, match="conv must be one of"):
    client.LocalConfig(batch_size=2, num_steps=1, conv='winograd')
  with pytest.raises(ValueError, match="last_batch must be one of"):
    client.LocalConfig(batch_size=2, num_steps=1, last_batch='pad')
  with pytest.raises(ValueError, match='mu must be >= 0'):
    client.proximal_wrapper(-1.0)
  with pytest.raises(ValueError, match='not parameters of the model'):
    _update(client.LocalConfig(batch_size=2, num_steps=1,
                               trainable=('nope',)))(
                                   _params(), {}, _client(2, 4),
                                   jax.random.key(0))


class StockConv(nn.Module):
  """Stock flax layers as a user writes them: no `train` argument."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _image_client(n, max_examples):
  data = _client(n, max_examples)
  x = np.random.default_rng(1).normal(size=(max_examples, 5, 5, 1))
  return dict(data, x=(x * data['mask'][:, None, None, None]).astype(
      np.float32))


def test_unrolled_loop_equals_scan_on_a_stock_flax_conv():
  # 3 real examples padded to 6, B = 2, 1 epoch: ceil(6 / 2) = 3 steps of
  # which ceil(3 / 2) = 2 are real, the second half masked. The scan skips
  # the padded step with a cond; the unrolled loop runs it as a no-op: same
  # outputs up to float32 reassociation.
  model = StockConv()
  params = model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))['params']
  data = _image_client(3, 6)
  outs = {}
  # The convolutions rewritten as im2col matmuls give the same outputs too.
  for loop, conv in (('scan', 'native'), ('unroll', 'native'),
                     ('scan', 'im2col')):
    local = client.LocalConfig(batch_size=2, num_epochs=1, loop=loop,
                               conv=conv)
    update = client.make_client_update(train.classification_loss(model),
                                       optax.sgd(0.3), local)
    outs[loop, conv] = jax.jit(update)(params, {}, data, jax.random.key(4))
  scan = outs['scan', 'native']
  assert float(scan.metrics['num_steps']) == 2.0
  assert float(scan.metrics['count']) == 3.0
  assert float(jnp.abs(scan.delta['Conv_0/kernel']).sum()) > 0
  for other in (outs['unroll', 'native'], outs['scan', 'im2col']):
    for k in ('num_steps', 'count', 'correct'):
      assert float(other.metrics[k]) == float(scan.metrics[k])
    np.testing.assert_allclose(other.metrics['loss_sum'],
                               scan.metrics['loss_sum'], rtol=1e-5)
    for k in scan.delta:
      np.testing.assert_allclose(other.delta[k], scan.delta[k], rtol=1e-5,
                                 atol=1e-6)


def test_auto_loop_unrolls_convolutions_on_cpu_only():
  conv_params = StockConv().init(jax.random.key(0),
                                 jnp.zeros((1, 5, 5, 1)))['params']
  conv_loss = train.classification_loss(StockConv())
  batch = {k: v[:2] for k, v in _image_client(2, 2).items()}
  conv = execution.traced_primitives(
      lambda p: conv_loss(p, {}, batch, None)[0], conv_params)
  dense = execution.traced_primitives(
      lambda p: _LOSS(p, {}, {k: v[:2] for k, v in _client(2, 2).items()},
                      None)[0], _params())
  assert 'conv_general_dilated' in conv
  assert 'conv_general_dilated' not in dense and 'dot_general' in dense
  assert client.resolve_loop('auto', 8, conv, 'cpu') == 'unroll'
  assert client.resolve_loop('auto', 8, dense, 'cpu') == 'scan'
  assert client.resolve_loop('auto', 8, conv, 'gpu') == 'scan'
  too_long = client.AUTO_UNROLL_MAX_STEPS + 1
  assert client.resolve_loop('auto', too_long, conv, 'cpu') == 'scan'
  assert client.resolve_loop('unroll', 8, dense, 'cpu') == 'unroll'
  assert client.resolve_conv('auto', 'cpu') == 'im2col'
  assert client.resolve_conv('auto', 'gpu') == 'native'
  # Rewritten, the step holds no convolution any more.
  rewritten = client.with_cpu_convolutions(conv_loss)
  assert 'conv_general_dilated' not in execution.traced_primitives(
      lambda p: rewritten(p, {}, batch, None)[0], conv_params)
  # The choice made while tracing is kept for the run's metrics.
  _update(client.LocalConfig(batch_size=2, num_steps=1, loop='auto'))(
      _params(), {}, _client(2, 2), jax.random.key(0))
  assert execution.resolved_choices()['local_loop'] == 'scan'


def _linear_loss(params, model_state, batch, rng):
  """-mean(w * x) over real examples: the SGD step adds lr * mean(x)."""
  del rng
  mask = batch['mask']
  loss = -train.masked_mean(params['w'] * batch['x'], mask)
  sums = {'loss_sum': -jnp.sum(params['w'] * batch['x'] * mask),
          'correct': jnp.zeros(()), 'count': jnp.sum(mask)}
  return loss, (sums, model_state)


def test_fill_last_batch_follows_fedjax_shuffle_repeat_batch():
  # n = 3 examples x = 1, 2, 4 (padded to 4), B = 2. FedJAX-style batches
  # take positions of one stream of epoch permutations, so 3 steps cover
  # exactly two epochs: w moves by lr * (sum of batch means) =
  # lr * 2 * (1 + 2 + 4) / 2 = 7 lr, whatever the permutations. Masked
  # padding would have stepped on a lone example instead.
  lr = 0.1
  data = {'x': np.array([1.0, 2.0, 4.0, 9.0], np.float32),
          'y': np.zeros(4, np.int32),
          'mask': np.array([1, 1, 1, 0], np.float32)}
  params = {'w': jnp.zeros(())}
  for local in (client.LocalConfig(batch_size=2, num_steps=3,
                                   last_batch='fill'),
                client.LocalConfig(batch_size=2, num_epochs=2,
                                   last_batch='fill')):
    update = jax.jit(client.make_client_update(_linear_loss, optax.sgd(lr),
                                               local))
    for seed in range(3):
      out = update(params, {}, data, jax.random.key(seed))
      np.testing.assert_allclose(out.delta['w'], 7 * lr, rtol=1e-6)
      assert float(out.metrics['count']) == 6.0
      assert float(out.metrics['num_steps']) == 3.0
  # One epoch: ceil(3 / 2) = 2 steps, the second filled from epoch 1.
  batch_at = jax.jit(client.local_batch, static_argnums=(3, 4, 5))
  seen = []
  for step in range(2):
    batch = batch_at(data, jax.random.key(0), jnp.asarray(step), 2, 1,
                     'fill')
    np.testing.assert_array_equal(batch['mask'], 1.0)
    seen += np.asarray(batch['x']).tolist()
  assert sorted(seen[:3]) == [1.0, 2.0, 4.0] and seen[3] in (1.0, 2.0, 4.0)
  late = batch_at(data, jax.random.key(0), jnp.asarray(2), 2, 1, 'fill')
  np.testing.assert_array_equal(late['mask'], 0.0)


class StockPoolConv(nn.Module):
  """Stock conv + max pools: one tiling (rewritten), one overlapping (not)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.max_pool(x, (3, 3), (1, 1), padding='SAME')
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_cpu_rewrite_turns_tiling_max_pools_into_windowed_max():
  model = StockPoolConv()
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))['params']
  loss = train.classification_loss(model)
  rewritten = client.with_cpu_convolutions(loss)
  x = np.random.default_rng(2).normal(size=(4, 6, 6, 1)).astype(np.float32)
  batch = {'x': jnp.asarray(x), 'y': jnp.array([0, 1, 2, 0]),
           'mask': jnp.ones(4)}
  def count(fn, primitive):  # Also inside nested jits.
    text = str(jax.make_jaxpr(lambda p: fn(p, {}, batch, None)[0])(params))
    return text.count(f' {primitive}[')
  assert count(loss, 'reduce_window_max') == 2
  # The tiling pool is gone, the overlapping one is lax's as written.
  assert count(rewritten, 'reduce_window_max') == 1
  assert count(rewritten, 'conv_general_dilated') == 0
  want = jax.grad(lambda p: loss(p, {}, batch, None)[0])(params)
  got = jax.grad(lambda p: rewritten(p, {}, batch, None)[0])(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _pull_loss(params, model_state, batch, rng):
  """mean((w - x)^2) / 2 over real examples: SGD pulls w to each batch's
  mean, so where w ends depends on the order of the batches."""
  del rng
  mask = batch['mask']
  per_example = 0.5 * jnp.square(params['w'] - batch['x'])
  sums = {'loss_sum': jnp.sum(per_example * mask),
          'correct': jnp.zeros(()), 'count': jnp.sum(mask)}
  return train.masked_mean(per_example, mask), (sums, model_state)


def _pull_reference(data, key, num_steps, batch_size, lr, last_batch):
  """w after SGD on `local_batch`'s batches, one step at a time."""
  batch_key = jax.random.split(key)[0]  # As the client update splits it.
  w = 0.0
  for step in range(num_steps):
    batch = client.local_batch(data, batch_key, jnp.int32(step), batch_size,
                               None, last_batch)
    mask, x = np.asarray(batch['mask']), np.asarray(batch['x'])
    if mask.sum():
      w -= lr * float(np.sum(mask * (w - x)) / mask.sum())
  return w


@pytest.mark.parametrize('last_batch,n,batch_size', [
    ('mask', 5, 2),   # 3 steps per epoch, the last one short
    ('fill', 5, 2),   # batches span two epochs (n >= B)
    ('fill', 3, 5),   # n < B: some batches span three epochs
])
def test_local_steps_draw_each_epoch_order_once_as_local_batch_does(
    last_batch, n, batch_size):
  # 8 steps cross several epochs. The update draws an epoch's order once
  # and keeps it; its batches must be local_batch's, step by step, in both
  # loops and under a vmap (where the kept order is a select).
  data = {'x': np.array([1.0, 2.0, 4.0, 8.0, 16.0, 0.0], np.float32),
          'y': np.zeros(6, np.int32),
          'mask': (np.arange(6) < n).astype(np.float32)}
  lr, key = 0.5, jax.random.key(7)
  want = _pull_reference(data, key, 8, batch_size, lr, last_batch)
  # The order matters: another key's batches end elsewhere.
  other = _pull_reference(data, jax.random.key(8), 8, batch_size, lr,
                          last_batch)
  assert abs(other - want) > 0.01
  params = {'w': jnp.zeros(())}
  for loop in ('scan', 'unroll'):
    update = client.make_client_update(
        _pull_loss, optax.sgd(lr),
        client.LocalConfig(batch_size=batch_size, num_steps=8, loop=loop,
                           last_batch=last_batch))
    out = jax.jit(update)(params, {}, data, key)
    np.testing.assert_allclose(out.delta['w'], want, rtol=1e-5)
    assert float(out.metrics['num_steps']) == 8.0
    two = jax.jit(jax.vmap(update, in_axes=(None, None, None, 0)))(
        params, {}, data, jnp.stack([key, jax.random.key(8)]))
    np.testing.assert_allclose(two.delta['w'], [want, other], rtol=1e-5)
