"""Tests of fedjax_ext.algorithms against Python-loop and by-hand references."""
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_ext import algorithms
from fedjax_ext import client
from fedjax_ext import rounds
from fedjax_ext import server_optimizers
from ondevice import checkpoint
from ondevice import train
from ondevice.models import build_model

_SIZES = np.array([5, 1, 8, 3, 6, 2])  # Uneven clients, padded to M = 8.
_IDS = jnp.array([4, 0, 9, 2, 7, 5], jnp.int32)


class Linear(nn.Module):
  """Softmax regression, written here to keep compiles small."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(3, name='out')(x)


def _params():
  return Linear().init(jax.random.key(0), jnp.zeros((1, 4)))['params']


def _cohort(sizes=_SIZES, max_examples=8, seed=0):
  rng = np.random.default_rng(seed)
  c = len(sizes)
  mask = (np.arange(max_examples)[None] < np.asarray(sizes)[:, None])
  x = rng.normal(size=(c, max_examples, 4)).astype(np.float32) * mask[..., None]
  y = (rng.integers(0, 3, (c, max_examples)) * mask).astype(np.int32)
  return {'x': x, 'y': y, 'mask': mask.astype(np.float32)}


_LOSS = train.classification_loss(Linear())
_LOCAL = client.LocalConfig(batch_size=3, num_epochs=2)
# Shared across tests: each factory call is a new jit, and compiling a round
# is what takes the time here.
_FEDAVG = algorithms.fedavg(_LOSS, optax.sgd(0.3), _LOCAL)
_FEDADAM = algorithms.fedadam(_LOSS, optax.sgd(0.3), _LOCAL,
                              server_learning_rate=0.05)


def _assert_trees_close(a, b, atol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=atol)


def _fedavg_round(params, cohort, key, ids=_IDS):
  return _FEDAVG.apply(_FEDAVG.init(params), cohort, ids, key)


def test_vmapped_round_equals_a_python_loop_over_clients():
  params, cohort, key = _params(), _cohort(), jax.random.key(7)
  state, metrics = _fedavg_round(params, cohort, key)

  update = jax.jit(client.make_client_update(_LOSS, optax.sgd(0.3), _LOCAL))
  clients_key = rounds.split_round_key(key).clients
  total, weight_sum = None, 0.0
  for i in range(len(_SIZES)):
    data = {k: v[i] for k, v in cohort.items()}
    out = update(params, {}, data, rounds.client_key(clients_key, _IDS[i]))
    scaled = jax.tree.map(lambda d: float(out.weight) * d, out.delta)
    total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    weight_sum += float(out.weight)
  flat = train.flatten_params(params)
  expected = {k: flat[k] + total[k] / weight_sum for k in flat}
  _assert_trees_close(train.flatten_params(state.params), expected)
  assert float(metrics['total_weight']) == _SIZES.sum()
  assert float(metrics['num_aggregated']) == len(_SIZES)
  assert int(state.round) == 1


def test_one_full_batch_step_equals_centralised_sgd():
  # With one local SGD step on the full client batch, client i sends
  # delta_i = -lr * grad L_i, L_i its mean loss over n_i examples. The
  # n_i-weighted mean is -lr * sum_i n_i grad L_i / sum_i n_i
  # = -lr * grad (sum of all losses / N), one SGD step on the union.
  params, cohort = _params(), _cohort()
  local = client.LocalConfig(batch_size=8, num_steps=1)
  algorithm = algorithms.fedavg(_LOSS, optax.sgd(0.3), local)
  state, _ = algorithm.apply(algorithm.init(params), cohort, _IDS,
                             jax.random.key(0))
  valid = cohort['mask'] > 0
  union = {'x': cohort['x'][valid], 'y': cohort['y'][valid],
           'mask': np.ones(valid.sum(), np.float32)}
  grads = jax.grad(lambda p: _LOSS(p, {}, union, None)[0])(params)
  expected = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
  _assert_trees_close(state.params, expected)


def test_fedprox_with_zero_mu_and_fedavgm_without_momentum_equal_fedavg():
  params, cohort = _params(), _cohort()
  reference = _FEDAVG
  variants = [algorithms.fedprox(_LOSS, optax.sgd(0.3), _LOCAL, mu=0.0),
              algorithms.fedavgm(_LOSS, optax.sgd(0.3), _LOCAL, momentum=0.0)]
  ref_state = reference.init(params)
  states = [v.init(params) for v in variants]
  for r in range(2):
    key = jax.random.key(r)
    ref_state, _ = reference.apply(ref_state, cohort, _IDS, key)
    states = [v.apply(s, cohort, _IDS, key)[0]
              for v, s in zip(variants, states)]
  for s in states:
    _assert_trees_close(s.params, ref_state.params, atol=1e-6)


def test_fedadam_applies_its_server_optimizer_to_the_mean_delta():
  # Reddi et al. 2021: the server optimiser sees -mean_delta as a gradient;
  # FedAvg with server rate 1 exposes mean_delta as its params change.
  params, cohort, key = _params(), _cohort(), jax.random.key(3)
  avg_state, _ = _fedavg_round(params, cohort, key)
  mean_delta = jax.tree.map(jnp.subtract, avg_state.params, params)
  neg = jax.tree.map(jnp.negative, train.flatten_params(mean_delta))
  flat = train.flatten_params(params)
  optimizer = server_optimizers.adaptive_server_optimizer('adam', 0.05)
  updates, _ = optimizer.update(neg, optimizer.init(flat), flat)
  expected = optax.apply_updates(flat, updates)
  state, _ = _FEDADAM.apply(_FEDADAM.init(params), cohort, _IDS, key)
  _assert_trees_close(train.flatten_params(state.params), expected)


@pytest.mark.parametrize('kind', server_optimizers.KINDS)
def test_adaptive_server_rules_match_the_paper(kind):
  # Algorithm 2 of Reddi et al. 2021, written out with NumPy.
  rng = np.random.default_rng(0)
  eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
  optimizer = server_optimizers.adaptive_server_optimizer(kind, eta, b1, b2,
                                                          tau)
  x = rng.normal(size=3).astype(np.float32)
  params = {'w': jnp.asarray(x)}
  opt_state = optimizer.init(params)
  m, v = np.zeros(3), np.full(3, tau ** 2)
  for _ in range(3):
    delta = rng.normal(size=3)
    updates, opt_state = optimizer.update(
        {'w': jnp.asarray(-delta, jnp.float32)}, opt_state, params)
    params = optax.apply_updates(params, updates)
    m = b1 * m + (1 - b1) * delta
    if kind == 'adagrad':
      v = v + delta ** 2
    elif kind == 'yogi':
      v = v - (1 - b2) * delta ** 2 * np.sign(v - delta ** 2)
    else:
      v = b2 * v + (1 - b2) * delta ** 2
    x = x + eta * m / (np.sqrt(v) + tau)
  np.testing.assert_allclose(params['w'], x, rtol=1e-5, atol=1e-6)


def _squared_loss(params, model_state, batch, rng):
  del rng
  pred = batch['x'] @ params['w']
  err = 0.5 * jnp.square(pred - batch['y']) * batch['mask']
  loss = jnp.sum(err) / jnp.maximum(jnp.sum(batch['mask']), 1.0)
  return loss, ({'loss_sum': jnp.sum(err), 'count': jnp.sum(batch['mask'])},
                model_state)


# SCAFFOLD on linear regression: 5 pool clients, K = 3 full-batch steps.
_NUM_CLIENTS, _LR, _STEPS = 5, 0.1, 3
_SCAFFOLD = algorithms.scaffold(
    _squared_loss, _LR, client.LocalConfig(batch_size=4, num_steps=_STEPS),
    num_clients=_NUM_CLIENTS)


def _scaffold_setup():
  """A cohort of 3 clients and a state with non-zero c and c_i."""
  rng = np.random.default_rng(0)
  sizes = np.array([4, 2, 3])
  mask = (np.arange(4)[None] < sizes[:, None]).astype(np.float32)
  cohort = {'x': rng.normal(size=(3, 4, 2)).astype(np.float32),
            'y': rng.normal(size=(3, 4)).astype(np.float32), 'mask': mask}
  x0 = np.array([0.5, -0.3], np.float32)
  c = np.array([0.2, -0.1], np.float32)
  ci = rng.normal(size=(_NUM_CLIENTS, 2)).astype(np.float32)
  state = _SCAFFOLD.init({'w': jnp.asarray(x0)})._replace(
      server_control={'w': jnp.asarray(c)},
      client_controls={'w': jnp.asarray(ci)})
  return state, cohort, sizes, x0, c, ci


def test_scaffold_control_variates_follow_the_paper():
  state, cohort, sizes, x0, c, ci = _scaffold_setup()
  num_clients, lr, steps = _NUM_CLIENTS, _LR, _STEPS
  ids = jnp.array([3, 0, 4], jnp.int32)
  new, metrics = _SCAFFOLD.apply(state, cohort, ids, jax.random.key(0))

  deltas, new_ci = [], ci.copy()
  for j, i in enumerate(np.asarray(ids)):
    xs, ys = cohort['x'][j, :sizes[j]], cohort['y'][j, :sizes[j]]
    y = x0.copy()
    for _ in range(steps):  # y <- y - lr (g(y) - c_i + c)
      g = xs.T @ (xs @ y - ys) / sizes[j]
      y = y - lr * (g - ci[i] + c)
    deltas.append(y - x0)
    new_ci[i] = ci[i] - c + (x0 - y) / (steps * lr)  # Option II.
  mean_delta = sum(n * d for n, d in zip(sizes, deltas)) / sizes.sum()
  new_c = c + (new_ci - ci).sum(0) / num_clients
  np.testing.assert_allclose(new.params['w'], x0 + mean_delta, atol=1e-5)
  np.testing.assert_allclose(new.client_controls['w'], new_ci, atol=1e-5)
  np.testing.assert_allclose(new.server_control['w'], new_c, atol=1e-5)
  assert float(metrics['num_aggregated']) == 3


def test_nonfinite_client_is_excluded_and_counted():
  params, key = _params(), jax.random.key(5)
  cohort = _cohort()
  cohort['x'][2, 0, 0] = np.nan
  state, metrics = _fedavg_round(params, cohort, key)
  assert float(metrics['num_nonfinite_clients']) == 1
  assert float(metrics['num_aggregated']) == len(_SIZES) - 1
  keep = np.array([0, 1, 3, 4, 5])
  without, _ = _fedavg_round(params, {k: v[keep] for k, v in cohort.items()},
                             key, _IDS[keep])
  _assert_trees_close(state.params, without.params)
  assert np.isfinite(float(metrics['train_loss']))


def test_round_without_any_valid_client_leaves_the_server_unchanged():
  params, cohort = _params(), _cohort()
  cohort['x'][:] = np.inf
  algorithm = _FEDADAM  # Its optimiser state must not move either.
  start = algorithm.init(params)
  state, metrics = algorithm.apply(start, cohort, _IDS, jax.random.key(0))
  assert float(metrics['num_nonfinite_clients']) == len(_SIZES)
  assert float(metrics['server_updated']) == 0.0
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((start.params, start.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(state.round) == 1


def test_dropout_drops_the_configured_fraction():
  params, cohort = _params(), _cohort()
  algorithm = algorithms.fedavg(
      _LOSS, optax.sgd(0.3), _LOCAL,
      rounds=rounds.RoundConfig(dropout_rate=0.5))
  state, metrics = algorithm.apply(algorithm.init(params), cohort, _IDS,
                                   jax.random.key(1))
  assert float(metrics['num_dropped']) == 3
  assert float(metrics['num_aggregated']) == 3
  # The total weight is the size of exactly three distinct clients.
  assert float(metrics['total_weight']) in {
      float(_SIZES[[a, b, c]].sum()) for a in range(6) for b in range(a)
      for c in range(b)}
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  with pytest.raises(ValueError, match='dropout_rate must lie in'):
    rounds.RoundConfig(dropout_rate=1.0)


def test_rounds_reduce_loss_without_recompiling():
  # 20 clients of a shared linear rule, an MLP from the model zoo.
  rng = np.random.default_rng(0)
  sizes = rng.integers(4, 17, 20)
  w = rng.normal(size=(4, 3))
  mask = (np.arange(16)[None] < sizes[:, None]).astype(np.float32)
  x = rng.normal(size=(20, 16, 4)).astype(np.float32)
  cohort_all = {'x': x, 'y': np.argmax(x @ w, -1).astype(np.int32),
                'mask': mask}
  model = build_model('mlp', 3, hidden=(16,))
  loss = train.classification_loss(model)
  algorithm = algorithms.fedavg(
      loss, optax.sgd(0.3), client.LocalConfig(batch_size=8, num_epochs=1))
  state = algorithm.init(model.init(jax.random.key(0),
                                    jnp.zeros((1, 4)))['params'])
  union = {k: v.reshape((-1,) + v.shape[2:]) for k, v in cohort_all.items()}
  full_loss = jax.jit(lambda p: loss(p, {}, union, None)[0])
  before = float(full_loss(state.params))
  for r in range(15):
    ids = np.sort(np.random.default_rng(r).choice(20, 10, replace=False))
    cohort = {k: v[ids] for k, v in cohort_all.items()}
    state, metrics = algorithm.apply(state, cohort, ids.astype(np.int32),
                                     jax.random.key(r))
  assert algorithm.apply._cache_size() == 1
  after = float(full_loss(state.params))
  assert after < 0.6 * before, (before, after)
  assert float(metrics['train_accuracy']) > 0.7


def test_scaffold_excludes_a_client_id_outside_the_pool():
  state, cohort, *_ = _scaffold_setup()
  ids = jnp.array([3, 0, _NUM_CLIENTS + 2], jnp.int32)
  new, metrics = _SCAFFOLD.apply(state, cohort, ids, jax.random.key(0))
  assert float(metrics['num_nonfinite_clients']) == 1
  assert float(metrics['num_aggregated']) == 2
  assert np.isfinite(np.asarray(new.client_controls['w'])).all()
  assert np.isfinite(np.asarray(new.params['w'])).all()


def _raw(x):
  is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return np.asarray(jax.random.key_data(x) if is_key else x)


def test_scaffold_state_survives_a_checkpoint(tmp_path):
  state, cohort, *_ = _scaffold_setup()
  state, _ = _SCAFFOLD.apply(state, cohort, jnp.array([1, 2, 4], jnp.int32),
                             jax.random.key(0))
  saved = {'server': state, 'key': jax.random.key(42)}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(int(state.round), saved)
  restored = ckpt.restore(1, saved)
  ckpt.close()
  assert isinstance(restored['server'], algorithms.ScaffoldState)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(_raw(a), _raw(b))


def test_bad_round_inputs_are_errors():
  algorithm = _FEDAVG
  state, cohort = algorithm.init(_params()), _cohort()
  with pytest.raises(ValueError, match='client_ids has shape'):
    algorithm.apply(state, cohort, _IDS[:3], jax.random.key(0))
  with pytest.raises(ValueError, match='leading shape'):
    algorithm.apply(state, dict(cohort, y=cohort['y'][:, :4]), _IDS,
                    jax.random.key(0))
  with pytest.raises(ValueError, match='tau must be > 0'):
    algorithms.fedadam(_LOSS, optax.sgd(0.3), _LOCAL, tau=0.0)
  with pytest.raises(ValueError, match='Unknown adaptive server optimiser'):
    server_optimizers.adaptive_server_optimizer('rmsprop', 0.1)
  with pytest.raises(ValueError, match='num_clients must be >= 1'):
    algorithms.scaffold(_LOSS, 0.1, _LOCAL, num_clients=0)


def test_stateful_dp_aggregator_and_compression_plug_into_the_hooks():
  # The other engineer's DP-FedAvg (adaptive clipping, Andrew et al. 2021)
  # and int8 quantisation wired through RoundConfig's hooks.
  from fedjax_ext import compression  # pylint: disable=g-import-not-at-top
  from fedjax_ext import privacy  # pylint: disable=g-import-not-at-top
  dp = privacy.dp_aggregator(privacy.DPConfig(
      noise_multiplier=0.1, clip_norm=1e-3, expected_num_clients=6,
      adaptive=True))
  config = rounds.RoundConfig(stateful_aggregator=dp, uniform_weights=True,
                              transform=compression.stochastic_quantize(8))
  algorithm = algorithms.fedavg(_LOSS, optax.sgd(0.3), _LOCAL, rounds=config)
  state = algorithm.init(_params())
  assert float(state.aggregator_state.clip_norm) == pytest.approx(1e-3)
  for r in range(2):
    state, metrics = algorithm.apply(state, _cohort(), _IDS,
                                     jax.random.key(r))
  # Every update is far above the clip, so the adaptive clip grows.
  assert float(state.aggregator_state.clip_norm) > 1e-3
  assert float(metrics['transform/bytes_sent']) > 0
  assert algorithm.apply._cache_size() == 1
  with pytest.raises(ValueError, match='set only one'):
    rounds.RoundConfig(aggregator=rounds.weighted_mean,
                       stateful_aggregator=dp)


def test_every_algorithm_takes_the_standard_factory_arguments():
  """ALGORITHMS has one shape: (loss_fn, client_optimizer, local, *, ...)."""
  for name, factory in algorithms.ALGORITHMS.items():
    params = list(inspect.signature(factory).parameters.values())
    assert [p.name for p in params[:3]] == [
        'loss_fn', 'client_optimizer', 'local'], name
    keywords = {p.name for p in params[3:]}
    assert {'server_learning_rate', 'rounds'} <= keywords, name


def test_scaffold_table_entry_is_scaffold():
  state, cohort, *_ = _scaffold_setup()
  ids = jnp.array([3, 0, 4], jnp.int32)
  entry = algorithms.ALGORITHMS['scaffold'](
      _squared_loss, optax.sgd(_LR),
      client.LocalConfig(batch_size=4, num_steps=_STEPS),
      num_clients=_NUM_CLIENTS, local_learning_rate=_LR)
  via_table, _ = entry.apply(state, cohort, ids, jax.random.key(0))
  direct, _ = _SCAFFOLD.apply(state, cohort, ids, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(via_table), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(a, b)
