"""Per-FedAvg and federated Reptile against hand-written references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_ext import client as client_lib
from fedjax_ext import algorithms
from fedjax_ext import meta_client
from ondevice import models
from ondevice import train

ALPHA, BETA = 0.3, 0.2


def _data(num_real: int, max_examples: int = 10, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(max_examples, 6)).astype(np.float32)
  y = rng.integers(0, 3, max_examples).astype(np.int32)
  mask = (np.arange(max_examples) < num_real).astype(np.float32)
  return {'x': jnp.asarray(x), 'y': jnp.asarray(y), 'mask': jnp.asarray(mask)}


def _setup():
  model = models.build_model('mlp', 3, hidden=(5,))
  params = model.init(jax.random.key(1), jnp.zeros((1, 6)))['params']
  loss_fn = train.classification_loss(model)
  return loss_fn, params


def _loss(loss_fn, params, batch):
  return loss_fn(params, {}, batch, jax.random.key(0))[0]


def test_support_query_are_disjoint_real_examples():
  data = _data(num_real=5, max_examples=8)
  task, enough = meta_client.support_query(data, jax.random.key(3), 2)
  assert bool(enough)
  rows = []
  for part in ('support', 'query'):
    np.testing.assert_array_equal(task[part]['mask'], [1.0, 1.0])
    for x in np.asarray(task[part]['x']):
      rows.append(int(np.flatnonzero(np.all(np.asarray(data['x']) == x,
                                            axis=1))[0]))
  assert len(set(rows)) == 4 and max(rows) < 5  # disjoint, never padding
  _, enough = meta_client.support_query(data, jax.random.key(3), 3)
  assert not bool(enough)  # 5 real examples < 2 * 3


def _client_task(data, key, size):
  """The task the client update draws for its first (only) meta-step."""
  step_key = jax.random.split(key, 1)[0]
  task_key, _ = jax.random.split(step_key)
  task, _ = meta_client.support_query(data, task_key, size)
  return task


@pytest.mark.parametrize('variant', ['first_order', 'hessian_free'])
def test_per_fedavg_client_step_equals_the_maml_formula(variant):
  loss_fn, params = _setup()
  local = client_lib.LocalConfig(batch_size=3, num_steps=1)
  data, key = _data(num_real=8), jax.random.key(7)
  learner_grad = meta_client.maml.gradient_meta_learner(
      loss_fn, optax.identity(), inner_lr=ALPHA, inner_steps=1,
      first_order=variant == 'first_order').task_gradient
  client = meta_client.meta_client_update(learner_grad, optax.sgd(BETA),
                                              local, num_tasks=1)
  out = client(params, {}, data, key, None)

  task = _client_task(data, key, 3)
  flat = train.flatten_params(params)
  support_grad = jax.grad(lambda p: _loss(
      loss_fn, train.unflatten_params(p), task['support']))
  query_grad = jax.grad(lambda p: _loss(
      loss_fn, train.unflatten_params(p), task['query']))
  adapted = {k: flat[k] - ALPHA * g for k, g in support_grad(flat).items()}
  g = query_grad(adapted)
  if variant == 'hessian_free':
    # (I - alpha H_S(w)) g, with H_S(w) g as a forward-over-reverse product.
    _, hvp = jax.jvp(support_grad, (flat,), (g,))
    g = {k: g[k] - ALPHA * hvp[k] for k in g}
  for k in flat:
    np.testing.assert_allclose(out.delta[k], -BETA * g[k], rtol=2e-4,
                               atol=1e-6, err_msg=k)
  assert float(out.weight) == 8.0
  assert float(out.metrics['count']) == 3.0


def test_fed_reptile_client_trains_on_support_and_query():
  loss_fn, params = _setup()
  steps = 3
  local = client_lib.LocalConfig(batch_size=2, num_steps=steps)
  learner = meta_client.reptile.reptile(
      loss_fn, optax.identity(), inner_optimizer=optax.sgd(BETA),
      inner_steps=steps)
  client = meta_client.meta_client_update(
      learner.task_gradient, optax.sgd(1.0), local, num_tasks=1)
  data, key = _data(num_real=6), jax.random.key(5)
  out = client(params, {}, data, key, None)
  task = _client_task(data, key, 2)
  batch = {k: jnp.concatenate([task['support'][k], task['query'][k]])
           for k in ('x', 'y', 'mask')}
  flat = train.flatten_params(params)
  grad = jax.grad(lambda p: _loss(loss_fn, train.unflatten_params(p), batch))
  w = dict(flat)
  for _ in range(steps):
    w = {k: w[k] - BETA * g for k, g in grad(w).items()}
  for k in flat:
    np.testing.assert_allclose(out.delta[k], w[k] - flat[k], rtol=2e-4,
                               atol=1e-6, err_msg=k)


def test_round_skips_clients_without_a_task_and_averages_the_rest():
  loss_fn, params = _setup()
  local = client_lib.LocalConfig(batch_size=2, num_steps=2)
  algorithm = algorithms.per_fedavg(loss_fn, optax.sgd(BETA), local,
                                         alpha=ALPHA)
  clients = [_data(6, seed=0), _data(3, seed=1), _data(10, seed=2)]
  cohort = {k: jnp.stack([c[k] for c in clients]) for k in clients[0]}
  state = algorithm.init(params, {})
  new_state, metrics = algorithm.apply(state, cohort, jnp.arange(3),
                                       jax.random.key(0))
  assert float(metrics['num_empty_clients']) == 1.0  # 3 < 2 * 2 examples
  assert float(metrics['num_aggregated']) == 2.0
  assert float(metrics['total_weight']) == 16.0
  moved = optax.tree.norm(jax.tree.map(jnp.subtract, new_state.params,
                                       state.params))
  assert float(moved) > 0


def test_batch_norm_models_and_bad_arguments_are_refused():
  loss_fn, params = _setup()
  local = client_lib.LocalConfig(batch_size=2, num_steps=1)
  algorithm = algorithms.per_fedavg(loss_fn, optax.sgd(BETA), local)
  with pytest.raises(ValueError, match="norm='group'"):
    algorithm.init(params, {'batch_stats': {'mean': jnp.zeros(3)}})
  with pytest.raises(ValueError, match='variant'):
    algorithms.per_fedavg(loss_fn, optax.sgd(BETA), local,
                               variant='second_order')
  with pytest.raises(ValueError, match='alpha'):
    algorithms.per_fedavg(loss_fn, optax.sgd(BETA), local, alpha=0.0)
  with pytest.raises(ValueError, match='num_steps'):
    algorithms.fed_reptile(
        loss_fn, optax.sgd(BETA),
        client_lib.LocalConfig(batch_size=2, num_epochs=1))
