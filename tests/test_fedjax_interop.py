"""Tests of the fedjax shim and of fedjax_ext.fedjax_interop.

The round test runs FedJAX's own `fed_avg` and ours on one converted
FederatedData and model, in a setting where both are deterministic (every
client's single local batch is all its examples), so their server params
must agree to float precision.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_ext import algorithms
from fedjax_ext import client
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import fedjax_interop
from ondevice import train
from third_party import fedjax_compat

pytest.importorskip('fedjax')
hk = pytest.importorskip('haiku')
fedjax = fedjax_interop.import_fedjax()

# Client sizes; b'e' has no examples, b'c' is subsampled at M = 8.
_SIZES = {b'a': 3, b'b': 5, b'c': 12, b'd': 1, b'e': 0}


def _client_data(seed=0):
  rng = np.random.default_rng(seed)
  return {cid: {'x': rng.normal(size=(n, 4)).astype(np.float32),
                'y': rng.integers(0, 3, n).astype(np.int64)}
          for cid, n in _SIZES.items()}


def test_shim_restores_tree_map_and_device_put_variants(monkeypatch):
  assert fedjax_compat.missing() == []  # import_fedjax() installed it.
  tree = {'a': jnp.arange(3.0), 'b': (jnp.ones(2),)}
  doubled = jax.tree_map(lambda v: 2 * v, tree)
  np.testing.assert_array_equal(doubled['a'], [0.0, 2.0, 4.0])
  assert jax.tree_leaves(tree)[1].shape == (2,)

  devices = jax.devices()[:1]
  sharded = jax.device_put_sharded([{'w': jnp.array([1.0, 2.0])}], devices)
  assert sharded['w'].shape == (1, 2)
  np.testing.assert_array_equal(sharded['w'][0], [1.0, 2.0])
  replicated = jax.device_put_replicated(jnp.array(7.0), devices)
  np.testing.assert_array_equal(replicated, [7.0])
  with pytest.raises(ValueError, match='one shard per device'):
    jax.device_put_sharded([1.0, 2.0], devices)

  # Adds only what is missing; never overrides what JAX (still) defines.
  monkeypatch.delattr(jax, 'tree_leaves')
  sentinel = object()
  monkeypatch.setattr(jax, 'tree_map', sentinel)
  assert fedjax_compat.install() == ['tree_leaves']
  assert jax.tree_map is sentinel
  assert fedjax_compat.install() == []


def test_source_keeps_ids_sizes_and_values():
  data = _client_data()
  fd = fedjax.InMemoryFederatedData(data)
  source = fedjax_interop.FederatedDataSource(fd)
  assert source.client_ids == (b'a', b'b', b'c', b'd')
  np.testing.assert_array_equal(source.sizes, [3, 5, 12, 1])
  assert source.num_empty == 1

  cohort = source.cohort([0, 2, 3], max_examples=8, key=jax.random.key(1))
  assert cohort['x'].shape == (3, 8, 4) and cohort['x'].dtype == np.float32
  np.testing.assert_array_equal(cohort['mask'].sum(1), [3, 8, 1])
  np.testing.assert_array_equal(cohort['x'][0, :3], data[b'a']['x'])
  np.testing.assert_array_equal(cohort['y'][0, :3], data[b'a']['y'])
  np.testing.assert_array_equal(cohort['x'][0, 3:], 0.0)
  np.testing.assert_array_equal(cohort['x'][2, :1], data[b'd']['x'])
  # b'c' keeps 8 of its 12 examples, distinct and in FedJAX's order.
  rows = [int(np.flatnonzero((data[b'c']['x'] == r).all(1))[0])
          for r in cohort['x'][1]]
  assert len(set(rows)) == 8 and rows == sorted(rows)
  np.testing.assert_array_equal(cohort['y'][1], data[b'c']['y'][rows])

  # FedJAX's batch preprocessor is applied on the way.
  scaled = fedjax_interop.FederatedDataSource(
      fd.preprocess_batch(lambda ex: {**ex, 'x': 2.0 * ex['x']}))
  np.testing.assert_array_equal(scaled.client_examples(1)['x'],
                                2.0 * data[b'b']['x'])

  ids = source.sample(jax.random.key(3), cohort_size=4, weighted=True)
  np.testing.assert_array_equal(ids, [0, 1, 2, 3])
  with pytest.raises(ValueError, match='larger than the pool of 4'):
    source.sample(jax.random.key(3), cohort_size=5)
  with pytest.raises(ValueError, match='repeat a client'):
    source.cohort([1, 1], max_examples=8, key=jax.random.key(0))


def test_to_array_dataset_matches_client_pool():
  data = _client_data()
  ds = fedjax_interop.to_array_dataset(fedjax.InMemoryFederatedData(data),
                                       num_classes=3)
  assert len(ds) == 21 and ds.num_classes == 3
  np.testing.assert_array_equal(ds.client_id,
                                [0] * 3 + [1] * 5 + [2] * 12 + [3])
  np.testing.assert_array_equal(ds.x[8:20], data[b'c']['x'])
  pool = cohort_lib.ClientPool.from_dataset(ds)
  np.testing.assert_array_equal(pool.sizes, [3, 5, 12, 1])
  assert ds.info['fedjax_client_ids'][pool.dataset_ids[2]] == b'c'


def test_bad_features_are_clear_errors():
  fd = fedjax.InMemoryFederatedData(
      {b'a': {'pixels': np.zeros((2, 3), np.float32),
              'y': np.zeros((2, 5), np.int32)}})
  with pytest.raises(ValueError, match="not \\['x'\\]"):
    fedjax_interop.FederatedDataSource(fd).client_examples(0)
  with pytest.raises(ValueError, match='one integer label per example'):
    fedjax_interop.FederatedDataSource(fd, x_key='pixels').client_examples(0)


def _haiku_model():
  transformed = hk.transform(
      lambda batch: hk.nets.MLP([5, 3])(batch['x']))

  def train_loss(batch, preds):
    return fedjax.metrics.unreduced_cross_entropy_loss(batch['y'], preds)

  return fedjax.create_model_from_haiku(
      transformed, {'x': jnp.zeros((1, 4))}, train_loss)


def test_our_round_on_fedjax_data_equals_fedjax_fed_avg():
  # Four clients of 4 examples; batch 4, 1 local step: each client's only
  # batch is all of its examples, in any order, so both sides are exact.
  rng = np.random.default_rng(5)
  data = {bytes([97 + i]): {'x': rng.normal(size=(4, 4)).astype(np.float32),
                            'y': rng.integers(0, 3, 4).astype(np.int32)}
          for i in range(4)}
  fd = fedjax.InMemoryFederatedData(data)
  model = _haiku_model()
  init = model.init(jax.random.PRNGKey(0))
  bridge = fedjax_interop.bridge_fedjax_model(model, init)
  assert sorted(train.flatten_params(bridge.params)) == [
      'mlp:~:linear_0/b', 'mlp:~:linear_0/w', 'mlp:~:linear_1/b',
      'mlp:~:linear_1/w']
  np.testing.assert_array_equal(
      bridge.to_fedjax(bridge.params)['mlp/~/linear_1']['w'],
      init['mlp/~/linear_1']['w'])

  theirs = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(0.5),
      fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=4, num_steps=1))
  clients = [(cid, fd.get_client(cid), jax.random.PRNGKey(i))
             for i, cid in enumerate(fd.client_ids())]
  their_state, _ = theirs.apply(theirs.init(init), clients)

  source = fedjax_interop.FederatedDataSource(fd)
  ids = source.sample(jax.random.key(0), cohort_size=4)
  cohort = source.cohort(ids, max_examples=4, key=jax.random.key(1))
  ours = algorithms.fedavg(bridge.loss_fn, optax.sgd(0.5),
                           client.LocalConfig(batch_size=4, num_steps=1))
  state, metrics = ours.apply(ours.init(bridge.params), cohort, ids,
                              jax.random.key(2))
  assert float(metrics['train_examples']) == 16.0
  mine = bridge.to_fedjax(state.params)
  moved = 0.0
  for a, b, c in zip(jax.tree_util.tree_leaves(mine),
                     jax.tree_util.tree_leaves(their_state.params),
                     jax.tree_util.tree_leaves(init)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = max(moved, float(jnp.max(jnp.abs(a - c))))
  assert moved > 1e-3  # The round really trained.

  # The fedjax.Model itself in place of a loss, on FedJAX's own params.
  direct = algorithms.fedavg(model, optax.sgd(0.5),
                             client.LocalConfig(batch_size=4, num_steps=1))
  state, _ = direct.apply(direct.init(init), cohort, ids, jax.random.key(2))
  back = fedjax_interop.to_haiku_params(state.params)
  assert jax.tree_util.tree_structure(back) == (
      jax.tree_util.tree_structure(init))
  for a, b in zip(jax.tree_util.tree_leaves(back),
                  jax.tree_util.tree_leaves(their_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bridge_names_stax_params_and_masks_the_loss():
  from jax.example_libraries import stax  # pylint: disable=g-import-not-at-top
  init_fn, apply_fn = stax.serial(stax.Dense(3), stax.Relu, stax.Dense(2))

  def train_loss(batch, preds):
    return fedjax.metrics.unreduced_cross_entropy_loss(batch['y'], preds)

  model = fedjax.create_model_from_stax(init_fn, apply_fn, (-1, 4),
                                        train_loss)
  init = model.init(jax.random.PRNGKey(1))
  bridge = fedjax_interop.bridge_fedjax_model(model, init)
  assert sorted(train.flatten_params(bridge.params)) == ['0/0', '0/1', '2/0',
                                                         '2/1']
  back = bridge.to_fedjax(bridge.params)
  assert jax.tree_util.tree_structure(back) == (
      jax.tree_util.tree_structure(init))
  np.testing.assert_array_equal(back[2][0], init[2][0])

  # Padded examples (mask 0) change neither the loss nor the sums.
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  y = np.array([0, 1, 1], np.int32)
  full = {'x': x[:2], 'y': y[:2], 'mask': np.ones(2, np.float32)}
  padded = {'x': x, 'y': y, 'mask': np.array([1.0, 1.0, 0.0], np.float32)}
  loss_a, (sums_a, _) = bridge.loss_fn(bridge.params, {}, full, None)
  loss_b, (sums_b, _) = bridge.loss_fn(bridge.params, {}, padded, None)
  per_example = model.train_loss(full, model.apply_for_eval(init, full))
  np.testing.assert_allclose(loss_a, np.mean(per_example), rtol=1e-6)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  assert float(sums_b['count']) == 2.0
  np.testing.assert_allclose(sums_b['loss_sum'], 2 * loss_a, rtol=1e-6)


def test_bad_fedjax_inputs_are_clear_errors_or_logged_skips(caplog):
  # An empty client is counted and logged, never sampled.
  with caplog.at_level('WARNING'):
    source = fedjax_interop.FederatedDataSource(
        fedjax.InMemoryFederatedData(_client_data()))
  assert source.num_empty == 1
  assert '1 of 5 clients have no examples' in caplog.text

  # Labels 0..2 against a model with 2 outputs: says what to change.
  def train_loss(batch, preds):
    return fedjax.metrics.unreduced_cross_entropy_loss(batch['y'], preds)

  two = fedjax.create_model_from_haiku(
      hk.transform(lambda batch: hk.Linear(2)(batch['x'])),
      {'x': jnp.zeros((1, 4))}, train_loss)
  largest = max(int(v['y'].max()) for v in _client_data().values()
                if len(v['y']))
  with pytest.raises(ValueError, match=f'predicts 2 classes but the data has '
                     f'label {largest}; build the model with at least '
                     f'{largest + 1} outputs'):
    fedjax_interop.check_model_outputs(two, two.init(jax.random.PRNGKey(0)),
                                       source)
  three = _haiku_model()
  assert fedjax_interop.check_model_outputs(
      three, three.init(jax.random.PRNGKey(0)), source) == 3

  # One prediction per example is required.
  flat = fedjax.create_model_from_haiku(
      hk.transform(lambda batch: hk.Linear(3)(batch['x'].reshape(1, -1))),
      {'x': jnp.zeros((2, 4))}, train_loss)
  batch = {'x': jnp.zeros((2, 4)), 'y': jnp.zeros(2, jnp.int32),
           'mask': jnp.ones(2)}
  loss = fedjax_interop.as_loss_fn(flat)
  with pytest.raises(ValueError, match='one row per example'):
    loss(flat.init(jax.random.PRNGKey(0)), {}, batch, None)
  with pytest.raises(TypeError, match='or a fedjax.Model'):
    fedjax_interop.as_loss_fn(3)
  with pytest.raises(ValueError, match='use bridge_fedjax_model'):
    fedjax_interop.to_haiku_params(((jnp.zeros(2),),))
