"""Contribution analysis: units, the budgeted greedy search, the whole run."""
import json
import os

import jax
import numpy as np
import pytest

from configs import contribution_kws
from ondevice import models
from ondevice import train
from ondevice.data.base import ArrayDataset
from sparse_updates import contribution
from sparse_updates import experiment
from sparse_updates import presets
from sparse_updates import rules
from sparse_updates import search


def _unit(name, kind='bias'):
  return search.Unit(name, name.split(':')[0], kind, (name,))


def test_greedy_picks_best_gain_per_marginal_byte_within_budget():
  units = [_unit('a:bias'), _unit('b:bias'), _unit('c:weight', 'weight'),
           _unit('d:bias')]
  gains = {'a:bias': 0.02, 'b:bias': 0.03, 'c:weight': 0.05, 'd:bias': -0.01}
  cost = {'a:bias': 10, 'b:bias': 30, 'c:weight': 40, 'd:bias': 1}
  memory = lambda us: 100 + sum(cost[u.name] for u in us)
  # Ratios: a 0.002/B, b 0.001/B, c 0.00125/B; d has a negative gain.
  # Budget 150: a (110), then c (150); b no longer fits.
  result = search.greedy_search(units, gains, memory, 150)
  assert [u.name for u in result.units] == ['a:bias', 'c:weight']
  assert result.memory_bytes == 150 and result.feasible
  np.testing.assert_allclose(result.gain, 0.07)
  # A budget below the classifier-only scheme (100 B) is infeasible.
  assert not search.greedy_search(units, gains, memory, 99).feasible
  # A big budget takes every positive-gain unit and never d.
  names = {u.name for u in search.greedy_search(units, gains, memory,
                                                10**6).units}
  assert names == {'a:bias', 'b:bias', 'c:weight'}


def test_greedy_uses_marginal_not_standalone_memory():
  units = [_unit('early:bias'), _unit('late:bias')]
  gains = {'early:bias': 0.04, 'late:bias': 0.03}
  # Training the early bias makes the backward pass reach far: 60 B alone;
  # once it is chosen, the late bias costs nothing more.
  def memory(us):
    names = {u.name for u in us}
    return 60 if 'early:bias' in names else (10 if names else 0)
  result = search.greedy_search(units, gains, memory, 60)
  assert {u.name for u in result.units} == {'early:bias', 'late:bias'}
  assert result.memory_bytes == 60


def test_missing_gain_is_an_error():
  with pytest.raises(ValueError, match='No measured gain'):
    search.greedy_search([_unit('a:bias')], {}, lambda us: 0, 10)


def test_units_and_scheme_rules_of_a_cnn():
  params = {'conv1': {'kernel': np.zeros((3, 3, 1, 4)), 'bias': np.zeros(4)},
            'conv2': {'kernel': np.zeros((3, 3, 4, 8)), 'bias': np.zeros(8)},
            'classifier': {'kernel': np.zeros((8, 2)), 'bias': np.zeros(2)}}
  units = search.contribution_units(params, weight_fraction=0.5)
  assert [u.name for u in units] == ['conv1:bias', 'conv1:weight',
                                     'conv2:bias', 'conv2:weight']
  scheme = search.scheme_rules([units[1], units[2]])
  assert rules.trainable_paths(params, scheme) == (
      'classifier/bias', 'classifier/kernel', 'conv1/kernel', 'conv2/bias')
  assert rules.channel_fractions(params, scheme) == {'conv1/kernel': 0.5}


def test_split_adaptation_keeps_every_client_in_every_split():
  n = 40
  ds = ArrayDataset(x=np.zeros((n, 2), np.float32), y=np.zeros(n, np.int32),
                    client_id=np.repeat(np.arange(4), 10).astype(np.int32),
                    class_names=('a',))
  adapt, val, test = contribution.split_adaptation(ds, 0.4, 0.3, seed=0)
  assert (len(adapt), len(val), len(test)) == (16, 12, 12)
  for part in (adapt, val, test):
    assert set(part.clients()) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match='sum to less than 1'):
    contribution.split_adaptation(ds, 0.6, 0.4, seed=0)


def _images(n, seed):
  """4-class 8x8 images: the class sets the sign of two quadrants."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, n).astype(np.int32)
  x = rng.normal(scale=0.5, size=(n, 8, 8, 1)).astype(np.float32)
  x[:, :4, :4, 0] += np.where(y % 2 == 0, 1.0, -1.0)[:, None, None]
  x[:, 4:, 4:, 0] += np.where(y // 2 == 0, 1.0, -1.0)[:, None, None]
  return ArrayDataset(x=x, y=y, client_id=(np.arange(n) % 4).astype(
      np.int32), class_names=tuple('abcd'))


def test_run_end_to_end_on_synthetic_images(tmp_path):
  config = contribution_kws.get_config('smoke,same_words')
  config.finetune.num_steps = 4
  config.search.budgets_kb = (4, 64)
  config.search.batch_size = 1
  train_ds, held_out = _images(64, 0), _images(160, 1)
  # Pre-training is central.supervised's job (tested there); starting from
  # an initialisation keeps this test fast.
  model = models.build_model('mlp', 4, hidden=(8, 8))
  params = jax.jit(model.init)(jax.random.key(0), train_ds.x[:1])['params']
  results = experiment.run(config, str(tmp_path),
                             datasets=(train_ds, held_out),
                             pretrained=(model, params, {}))
  # Two hidden layers: a bias and a weight unit each.
  assert results['units'] == ['hidden1:bias', 'hidden1:weight',
                              'hidden2:bias', 'hidden2:weight']
  labels = [r['scheme'] for r in results['schemes']]
  assert labels == ['pre-trained (no update)', 'full', 'bias_only',
                    'last_k (k=2)', 'classifier_only', 'searched @ 4 KB',
                    'searched @ 64 KB']
  for found in results['search']:
    if found['feasible']:
      assert found['memory_bytes'] <= found['budget_bytes']
  by_label = {r['scheme']: r for r in results['schemes']}
  # Uploads: 64*8+8 + 8*8+8 + 8*4+4 = 628 params.
  assert by_label['full']['upload_kb'] * 1024 == 628 * 4
  assert by_label['classifier_only']['upload_kb'] * 1024 == 36 * 4
  assert (by_label['bias_only']['memory_kb'] <
          by_label['full']['memory_kb'])
  for name in ('contribution.json', 'contribution.md',
               'contribution_gains.png'):
    assert os.path.getsize(tmp_path / name) > 0
  with open(tmp_path / 'contribution.json') as f:
    assert json.load(f)['units'] == results['units']


def test_masked_fine_tuner_matches_the_partitioned_step():
  """One compiled masked step follows the real sparse step per scheme."""
  data = _images(64, 2)
  model = models.build_model('mlp', 4, hidden=(8, 8))
  params = jax.jit(model.init)(jax.random.key(0), data.x[:1])['params']
  order = presets.forward_order(model, {'params': params}, data.x[:1])
  # Biases of the last 2 layers, half of hidden2's output channels.
  scheme = presets.get_rules('tte', params, bias_k=2,
                             weight_layers=('hidden2',), weight_fraction=0.5,
                             layer_order=order)
  config = contribution_kws.get_config('smoke')
  config.finetune.num_steps = 3
  results = [contribution.FineTuner(model, config.finetune, partitioned=p)
             .finetune(params, {}, scheme, data, seed=0)[0]
             for p in (False, True)]
  masked, partitioned = (train.flatten_params(r) for r in results)
  for path in partitioned:
    np.testing.assert_allclose(masked[path], partitioned[path], rtol=1e-5,
                               atol=1e-6, err_msg=path)
  kernel = np.asarray(partitioned['hidden2/kernel'])
  moved = np.any(kernel != params['hidden2']['kernel'], axis=0)
  assert moved.sum() == 4  # Half of the 8 output channels.
  np.testing.assert_array_equal(partitioned['hidden1/kernel'],
                                params['hidden1']['kernel'])


@pytest.mark.parametrize('key,value,match', [
    ('schemes', ('full', 'everything'), 'unknown schemes'),
    ('search.budgets_kb', (256, 0), 'budgets_kb'),
    ('search.relu_mask_bits', 4, 'relu_mask_bits'),
    ('finetune.optimizer', 'lion', 'optimizer'),
    ('finetune.lr_grid', (0.01, 0.0), 'lr_grid'),
])
def test_bad_config_fields_are_named(key, value, match):
  config = contribution_kws.get_config('smoke')
  parent, _, leaf = key.rpartition('.')
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ValueError, match=match):
    experiment.validate_config(config)


def test_gains_within_noise_are_not_candidates():
  units = [_unit('a:bias'), _unit('b:bias')]
  gains = {'a:bias': 0.004, 'b:bias': 0.02}
  result = search.greedy_search(units, gains, lambda us: len(us), 10,
                                min_gain=0.006)
  assert [u.name for u in result.units] == ['b:bias']


def test_keyword_transfer_split_holds_new_words_out_of_pretraining():
  train_ds, held_out = _images(64, 0), _images(40, 1)
  pre, pre_test, new = contribution.keyword_transfer_split(
      train_ds, held_out, ('d', 'b'))
  assert pre.class_names == ('a', 'c') and new.class_names == ('d', 'b')
  # Counts per class survive; labels follow the new name order.
  for ds, names, src in ((pre, ('a', 'c'), train_ds),
                         (pre_test, ('a', 'c'), held_out),
                         (new, ('d', 'b'), held_out)):
    for label, name in enumerate(names):
      old = src.class_names.index(name)
      assert np.sum(ds.y == label) == np.sum(src.y == old)
      np.testing.assert_array_equal(ds.x[ds.y == label], src.x[src.y == old])
  with pytest.raises(ValueError, match='unknown'):
    contribution.keyword_transfer_split(train_ds, held_out, ('a', 'z'))
  with pytest.raises(ValueError, match='>= 2 pre-training'):
    contribution.keyword_transfer_split(train_ds, held_out, ('a', 'b', 'c'))


def test_new_head_keeps_the_body_and_draws_a_fresh_classifier():
  x = np.zeros((1, 8, 8, 1), np.float32)
  model = models.build_model('mlp', 2, hidden=(8, 8))
  params = model.init(jax.random.key(0), x)['params']
  new_model, new = contribution.new_head(
      model, params, 5, x, jax.random.key(7), 'mlp', 'none',
      {'hidden': (8, 8)})
  old_flat, new_flat = train.flatten_params(params), train.flatten_params(new)
  assert new_flat['classifier/kernel'].shape == (8, 5)
  fresh = train.flatten_params(new_model.init(jax.random.key(7), x)['params'])
  np.testing.assert_array_equal(new_flat['classifier/kernel'],
                                fresh['classifier/kernel'])
  for path in old_flat:
    if not path.startswith('classifier/'):
      np.testing.assert_array_equal(new_flat[path], old_flat[path])
  assert new_model.apply({'params': new}, x).shape == (1, 5)


def test_run_transfers_to_new_words(tmp_path):
  config = contribution_kws.get_config('smoke')
  config.model = 'mlp'
  config.model_kwargs = {'hidden': (8, 8)}
  config.transfer_words = ('c', 'd')
  config.finetune.num_steps = 4
  config.finetune.lr_grid = (0.001, 0.05)
  config.search.budgets_kb = (64,)
  train_ds, held_out = _images(64, 0), _images(160, 1)
  model = models.build_model('mlp', 2, hidden=(8, 8))
  params = jax.jit(model.init)(jax.random.key(0), train_ds.x[:1])['params']
  results = experiment.run(config, str(tmp_path),
                             datasets=(train_ds, held_out),
                             pretrained=(model, params, {}))
  assert results['task'] == {'kind': 'new_keywords',
                             'transfer_words': ['c', 'd'],
                             'pretrain_words': ['a', 'b']}
  by_label = {r['scheme']: r for r in results['schemes']}
  # A fresh head without training is chance: no 'pre-trained' row.
  assert 'pre-trained (no update)' not in by_label
  for row in results['schemes']:
    assert row['learning_rate'] in (0.001, 0.05)
  # A 2-way head on 8 features: 8*2+2 = 18 uploaded params.
  assert by_label['classifier_only']['upload_kb'] * 1024 == 18 * 4
  with open(tmp_path / 'contribution.md') as f:
    assert 'learn 2 new keywords (c, d)' in f.read()


def test_a_diverging_rate_is_skipped_and_a_diverging_analysis_stops(
    tmp_path, caplog):
  config = contribution_kws.get_config('smoke,same_words')
  config.finetune.num_steps = 4
  config.finetune.lr_grid = (0.01, 1e12)
  config.search.budgets_kb = (64,)
  train_ds, held_out = _images(64, 0), _images(160, 1)
  model = models.build_model('mlp', 4, hidden=(8, 8))
  params = jax.jit(model.init)(jax.random.key(0), train_ds.x[:1])['params']
  results = experiment.run(config, str(tmp_path / 'a'),
                           datasets=(train_ds, held_out),
                           pretrained=(model, params, {}))
  diverged = {r.getMessage().split(' diverged')[0] for r in caplog.records
              if ' diverged at learning rate' in r.getMessage()}
  assert diverged  # full updates at 1e12 leave float32
  for row in results['schemes'][1:]:
    if row['scheme'] in diverged:
      assert row['learning_rate'] == 0.01, row
    assert np.isfinite(row['test_accuracy'])
  config.finetune.learning_rate = 1e12  # the analysis' own rate
  with pytest.raises(FloatingPointError, match='learning_rate'):
    experiment.run(config, str(tmp_path / 'b'),
                   datasets=(train_ds, held_out),
                   pretrained=(model, params, {}))
