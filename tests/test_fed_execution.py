"""Tests of fedjax_ext.execution: every strategy computes the same round."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fedjax_ext import execution

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Builds one FedAvg round with dropout and a noisy clipping transform (so
# per-client keys matter) on 6 clients; `run(config)` returns flat results.
# Shared by the in-process chunked test and the 4-device subprocess.
_ROUND = textwrap.dedent('''
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from fedjax_ext import algorithms, client, execution, rounds
    from ondevice import train


    class Linear(nn.Module):

      @nn.compact
      def __call__(self, x, train=False):
        return nn.Dense(3, name='out')(x)


    def noisy_clip(delta, key):
      norm = optax.tree.norm(delta)
      scale = jnp.minimum(1.0, 0.05 / norm)
      keys = jax.random.split(key, len(delta))
      out = {k: scale * d + 1e-3 * jax.random.normal(kk, d.shape)
             for kk, (k, d) in zip(keys, sorted(delta.items()))}
      return out, {'norm': norm}


    def run(config):
      rng = np.random.default_rng(0)
      sizes = np.array([5, 1, 8, 3, 6, 2])
      mask = (np.arange(8)[None] < sizes[:, None]).astype(np.float32)
      cohort = {'x': rng.normal(size=(6, 8, 4)).astype(np.float32),
                'y': rng.integers(0, 3, (6, 8)).astype(np.int32),
                'mask': mask}
      ids = jnp.array([4, 0, 9, 2, 7, 5], jnp.int32)
      model = Linear()
      params = model.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
      algorithm = algorithms.fedavgm(
          train.classification_loss(model), optax.sgd(0.3),
          client.LocalConfig(batch_size=3, num_epochs=2),
          rounds=rounds.RoundConfig(dropout_rate=0.3, transform=noisy_clip,
                                    execution=config))
      state = algorithm.init(params)
      for r in range(2):
        state, metrics = algorithm.apply(state, cohort, ids,
                                         jax.random.key(r))
      leaves = jax.tree.leaves((state.params, state.opt_state))
      return (np.concatenate([np.ravel(x) for x in leaves]),
              {k: float(v) for k, v in metrics.items()})
''')


def _round_module():
  namespace = {}
  code = compile(_ROUND, '<fed_round>', 'exec')
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def test_auto_rule():
  config = execution.ExecutionConfig()
  small, big = 10_000, 10_000_000
  assert execution.resolve_strategy(config, small, 100, 1) == ('vmap', 100)
  # 10M params x 100 clients > 2^26: chunks of 6 (2^26 // 10M), balanced:
  # ceil(100 / 6) = 17 chunks of ceil(100 / 17) = 6 clients.
  assert execution.resolve_strategy(config, big, 100, 1) == ('chunked', 6)
  assert execution.resolve_strategy(config, small, 100, 4) == ('sharded', 100)
  assert execution.resolve_strategy(config, small, 2, 4) == ('vmap', 2)
  chunked = execution.ExecutionConfig('chunked', chunk_size=4)
  assert execution.resolve_strategy(chunked, small, 9, 1) == ('chunked', 3)
  assert execution.resolve_strategy(chunked, small, 10, 1) == ('chunked', 4)


def test_auto_rule_streams_mean_rounds_on_cpu():
  config = execution.ExecutionConfig()
  small, big = 10_000, 10_000_000
  for params in (small, big):
    assert execution.resolve_strategy(config, params, 100, 1, streamable=True,
                                      backend='cpu') == ('streamed', 1)
  # A tiny client update (below AUTO_STREAM_MIN_FLOPS) keeps the vmap.
  assert execution.resolve_strategy(config, small, 100, 1, streamable=True,
                                    backend='cpu',
                                    client_flops=5e4) == ('vmap', 100)
  assert execution.resolve_strategy(config, small, 100, 1, streamable=True,
                                    backend='cpu',
                                    client_flops=5e6) == ('streamed', 1)
  # Accelerators keep the vmap; several devices still shard.
  assert execution.resolve_strategy(config, small, 100, 1, streamable=True,
                                    backend='gpu') == ('vmap', 100)
  assert execution.resolve_strategy(config, small, 100, 4, streamable=True,
                                    backend='cpu') == ('sharded', 100)
  # An explicit chunk is balanced like 'chunked': 10 clients in chunks of
  # at most 4 -> 3 chunks of 4.
  streamed = execution.ExecutionConfig('streamed', chunk_size=4)
  assert execution.resolve_strategy(streamed, small, 10, 1,
                                    streamable=True) == ('streamed', 4)
  with pytest.raises(ValueError, match='weighted-mean aggregation'):
    execution.resolve_strategy(streamed, small, 10, 1, streamable=False)


def test_client_flops_counts_one_clients_matmul():
  import jax.numpy as jnp
  # One client: [8, 16] @ [16, 4] is 2 * 8 * 16 * 4 = 1024 FLOPs (+ the
  # add of the broadcast bias, 32).
  fn = lambda w, c: c['x'] @ w['k'] + w['b']
  flops = execution.client_flops(
      fn, {'k': jnp.ones((16, 4)), 'b': jnp.ones(4)},
      {'x': jnp.ones((5, 8, 16))})
  assert flops == pytest.approx(1024 + 32, rel=0.05)
  assert not flops.convolutions
  # A 3x3 'VALID' conv of a 4x4 map, one channel in and out: 2 * 2x2 * 9.
  conv = lambda w, c: jax.lax.conv(c['x'], w, (1, 1), 'VALID')
  cost = execution.client_flops(conv, jnp.ones((1, 1, 3, 3)),
                                {'x': jnp.ones((5, 1, 1, 4, 4))})
  assert cost.convolutions and cost == pytest.approx(72, rel=0.05)


def test_auto_rule_vmaps_convolutions_on_cpu():
  # A scan over clients would put the convolutions in a loop body.
  config = execution.ExecutionConfig()
  conv = execution.ClientCost(5e6, convolutions=True)
  assert execution.resolve_strategy(config, 10_000, 100, 1, streamable=True,
                                    backend='cpu', client_flops=conv) == (
                                        'vmap', 100)
  assert execution.resolve_strategy(
      config, 10_000, 100, 1, streamable=True, backend='cpu',
      client_flops=execution.ClientCost(5e6)) == ('streamed', 1)
  assert execution.resolve_strategy(config, 10_000_000, 100, 1,
                                    streamable=True, backend='cpu',
                                    client_flops=conv) == ('chunked', 6)
  assert execution.resolved_choices()['execution'] == 'chunked'


def test_bad_execution_configs_are_errors():
  with pytest.raises(ValueError, match='Unknown execution strategy'):
    execution.ExecutionConfig('pmap')
  with pytest.raises(ValueError, match='chunk_size must be >= 1'):
    execution.ExecutionConfig('chunked', chunk_size=0)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  with pytest.raises(ValueError, match="axis named 'clients'"):
    execution.ExecutionConfig('sharded', mesh=mesh)


def test_chunked_equals_vmap():
  run = _round_module()['run']
  vmapped, m_vmap = run(execution.ExecutionConfig('vmap'))
  # 6 clients in chunks of 4: the second chunk is padded with copies.
  chunked, m_chunk = run(execution.ExecutionConfig('chunked', chunk_size=4))
  np.testing.assert_allclose(chunked, vmapped, rtol=1e-5, atol=1e-6)
  assert m_chunk == pytest.approx(m_vmap, rel=1e-5, abs=1e-6)
  assert m_vmap['num_dropped'] == 2.0
  assert 'transform/norm' in m_vmap


@pytest.mark.parametrize('chunk_size', [None, 4])
def test_streamed_equals_vmap(chunk_size):
  run = _round_module()['run']
  vmapped, m_vmap = run(execution.ExecutionConfig('vmap'))
  # One client at a time, or chunks of 4 (the second padded with copies,
  # which must add nothing to the running sums).
  streamed, m_stream = run(execution.ExecutionConfig('streamed',
                                                     chunk_size=chunk_size))
  np.testing.assert_allclose(streamed, vmapped, rtol=1e-5, atol=1e-6)
  assert m_stream == pytest.approx(m_vmap, rel=1e-5, abs=1e-6)
  assert m_stream['num_dropped'] == 2.0
  assert m_stream['num_aggregated'] == 4.0


def test_streamed_round_with_a_robust_aggregator_is_an_error():
  import jax.numpy as jnp
  import optax
  from fedjax_ext import aggregators, algorithms, client, rounds
  from ondevice import train
  model = _round_module()['Linear']()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
  algorithm = algorithms.fedavg(
      train.classification_loss(model), optax.sgd(0.1),
      client.LocalConfig(batch_size=2, num_steps=1),
      rounds=rounds.RoundConfig(
          aggregator=aggregators.coordinate_median(),
          execution=execution.ExecutionConfig('streamed')))
  cohort = {'x': jnp.ones((3, 2, 4)), 'y': jnp.zeros((3, 2), jnp.int32),
            'mask': jnp.ones((3, 2))}
  with pytest.raises(ValueError, match='weighted-mean aggregation'):
    algorithm.apply(algorithm.init(params), cohort, None, jax.random.key(0))


_SHARDED = _ROUND + textwrap.dedent('''
    assert jax.device_count() == 4, jax.devices()
    vmapped, m_vmap = run(execution.ExecutionConfig('vmap'))
    sharded, m_shard = run(execution.ExecutionConfig('sharded'))
    strategy = execution.resolve_strategy(execution.ExecutionConfig(), 15, 6)
    print(json.dumps({
        'max_diff': float(np.max(np.abs(sharded - vmapped))),
        'metric_diff': max(abs(m_vmap[k] - m_shard[k]) for k in m_vmap),
        'auto': strategy[0]}))
''')


def test_sharded_over_four_devices_equals_single_device_vmap():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([_REPO, os.environ.get('PYTHONPATH',
                                                                '')]))
  proc = subprocess.run([sys.executable, '-c', 'import json\n' + _SHARDED],
                        cwd=_REPO, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['max_diff'] < 1e-5, result
  assert result['metric_diff'] < 1e-5, result
  assert result['auto'] == 'sharded'


@pytest.mark.parametrize('strategy,threads', [('streamed', 2),
                                              ('streamed', 4), ('vmap', 4)])
def test_host_threads_compute_the_one_computation_round(strategy, threads):
  run = _round_module()['run']
  one, m_one = run(execution.ExecutionConfig(strategy))
  # 6 clients in 4 parts of 2: the last part is two padded copies of
  # client 0, which must neither weigh nor count. 'vmap' joins the parts'
  # stacked updates before the aggregator; 'streamed' adds their sums.
  split, m_split = run(execution.ExecutionConfig(strategy,
                                                 host_threads=threads))
  np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6)
  assert m_split == pytest.approx(m_one, rel=1e-5, abs=1e-6)
  # round(0.3 x 6) = 2 of the 6 clients drop out; 4 are aggregated.
  assert (m_split['num_clients'], m_split['num_dropped'],
          m_split['num_aggregated']) == (6.0, 2.0, 4.0)
  assert execution.resolved_choices()['host_threads'] == threads


def test_host_threads_numbers_do_not_depend_on_scheduling(monkeypatch):
  run = _round_module()['run']
  config = execution.ExecutionConfig('streamed', host_threads=2)
  first, m_first = run(config)
  again, m_again = run(config)
  threaded_map = execution.host_map
  # The same parts run one after the other on this thread.
  monkeypatch.setattr(execution, 'host_map',
                      lambda fn, items, pool: threaded_map(fn, items, None))
  serial, m_serial = run(config)
  np.testing.assert_array_equal(again, first)
  np.testing.assert_array_equal(serial, first)
  assert m_again == m_first == m_serial


def test_host_map_runs_its_calls_at_the_same_time():
  import concurrent.futures
  import threading
  import jax.numpy as jnp
  # Each call waits for the other at the barrier: run one after the other,
  # the first would time out and break it.
  barrier = threading.Barrier(2, timeout=30)
  idents = []

  def fn(item):
    idents.append(threading.get_ident())
    barrier.wait()
    return jnp.asarray(item) * 2

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    out = execution.host_map(fn, [1, 5], pool)
  assert [int(x) for x in out] == [2, 10]
  assert len(set(idents)) == 2


def test_host_threads_bad_settings_are_errors():
  import jax.numpy as jnp
  import optax
  from fedjax_ext import algorithms, client, rounds
  from ondevice import train
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match='host_threads must be an integer'):
      execution.ExecutionConfig(host_threads=bad)
  with pytest.raises(ValueError, match='sharded execution'):
    execution.ExecutionConfig('sharded', host_threads=2)
  model = _round_module()['Linear']()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
  loss = train.classification_loss(model)
  local = client.LocalConfig(batch_size=2, num_steps=1)
  threaded = rounds.RoundConfig(
      execution=execution.ExecutionConfig(host_threads=2))
  with pytest.raises(ValueError, match='scaffold does not support'):
    algorithms.scaffold(loss, 0.1, local, num_clients=4, rounds=threaded)
  algorithm = algorithms.fedavg(loss, optax.sgd(0.1), local, rounds=threaded)
  cohort = {'x': jnp.ones((3, 2, 4)), 'y': jnp.zeros((3, 2), jnp.int32),
            'mask': jnp.ones((3, 2))}
  state = algorithm.init(params)
  with pytest.raises(ValueError, match='cannot be traced'):
    jax.jit(algorithm.apply)(state, cohort, None, jax.random.key(0))
