"""Ordered regex rules and the named presets, on DS-CNN's real param paths."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ondevice import models
from ondevice import train
from sparse_updates import presets
from sparse_updates import rules


@pytest.fixture(scope='module')
def dscnn():
  """DS-CNN-S with batch norm: conv0 + 4 x (dw, pw), each with a norm."""
  model = models.build_model('ds_cnn_s', 12, norm='batch')
  x = jnp.zeros((1, 98, 40))
  # eval_shape returns the tree with sorted keys: the layer order is lost.
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return model, variables, x


@pytest.fixture(scope='module')
def dscnn_params(dscnn):
  """Params in creation order, as a fresh `model.init` returns them."""
  model, variables, x = dscnn
  order = presets.forward_order(model, variables, x)
  flat = train.flatten_params(variables['params'])
  by_module = {}
  for path, leaf in flat.items():
    by_module.setdefault(path.rsplit('/', 1)[0], {})[path] = leaf
  ordered = {}
  for module in order:
    for name in (module, module + '_norm'):
      for path in ('kernel', 'scale', 'bias'):
        key = f'{name}/{path}'
        if key in by_module.get(name, {}):
          ordered[key] = flat[key]
  assert len(ordered) == len(flat)
  return train.unflatten_params(ordered)


def _paths(params, rule_list):
  return rules.trainable_paths(params, rule_list)


def test_first_match_wins_and_none_freezes(dscnn_params):
  bitfit = [('classifier/.*', 'train'), ('.*/bias', 'train'), ('.*', None)]
  got = _paths(dscnn_params, bitfit)
  # 9 convs + 9 norms have a bias each; the classifier adds its kernel.
  assert len(got) == 9 + 9 + 2
  assert 'classifier/kernel' in got and 'pw3/kernel' not in got
  # The same rules in the other order: the catch-all wins for everything.
  with pytest.raises(ValueError, match='freeze all 38 parameters'):
    _paths(dscnn_params, [('.*', None)] + bitfit)
  # An earlier, more specific rule overrides a later one.
  got = _paths(dscnn_params, [('pw4/bias', None)] + bitfit)
  assert 'pw4/bias' not in got and len(got) == 19


def test_unmatched_parameter_is_an_error_naming_it(dscnn_params):
  with pytest.raises(ValueError, match="'conv0/kernel' matches no rule"):
    _paths(dscnn_params, [('.*/bias', 'train')])


@pytest.mark.parametrize('bad,match', [
    ([('(', 'train')], 'not a valid regular expression'),
    ([('.*', 'yes')], 'invalid value'),
    ([('.*', 1.5)], 'invalid value'),
    ([('.*', True)], 'invalid value'),
    (['.*'], 'pair'),
    ('.*', 'list of'),
])
def test_malformed_rules_raise(dscnn_params, bad, match):
  with pytest.raises(ValueError, match=match):
    _paths(dscnn_params, bad)


@pytest.mark.parametrize('name,kwargs,expected', [
    ('full', {}, 38),                # 4 (conv0) + 4 x 8 (blocks) + 2.
    ('bias_only', {}, 20),           # 19 biases + the classifier kernel.
    ('bias_only', {'head': False}, 19),  # Every bias, the head's too.
    ('norm_only', {}, 18 + 2),       # 9 norms x (scale, bias) + classifier.
    ('classifier_only', {}, 2),
    ('last_k', {'k': 1}, 2),         # The classifier.
    ('last_k', {'k': 2}, 6),         # + pw4/{kernel,bias}, pw4_norm/{s,b}.
    ('last_k', {'k': 10}, 38),       # Every layer.
    ('sparse_channels', {}, 9 + 20),  # 9 conv kernels + BitFit's 20.
    ('lite_residual', {}, 20),       # No branches in a bare model.
])
def test_preset_counts(dscnn_params, name, kwargs, expected):
  got = _paths(dscnn_params, presets.get_rules(name, dscnn_params, **kwargs))
  assert len(got) == expected


def test_forward_order_recovers_a_sorted_tree(dscnn):
  model, variables, x = dscnn
  order = presets.forward_order(model, variables, x)
  assert order == ['conv0', 'dw1', 'pw1', 'dw2', 'pw2', 'dw3', 'pw3', 'dw4',
                   'pw4', 'classifier']
  with pytest.raises(ValueError, match='layer order is lost'):
    presets.get_rules('last_k', variables['params'], k=2)
  scheme = presets.get_rules('last_k', variables['params'], k=2,
                             layer_order=order)
  assert len(_paths(variables['params'], scheme)) == 6


def test_layers_follow_parameter_order_with_their_norms(dscnn_params):
  layers = presets.model_layers(dscnn_params)
  assert [l.name for l in layers] == [
      'conv0', 'dw1', 'pw1', 'dw2', 'pw2', 'dw3', 'pw3', 'dw4', 'pw4',
      'classifier']
  assert layers[3].paths == ('dw2/kernel', 'dw2/bias', 'dw2_norm/scale',
                             'dw2_norm/bias')
  assert layers[3].leaves('bias') == ('dw2/bias', 'dw2_norm/bias')
  reordered = presets.model_layers(
      dscnn_params, [l.name for l in reversed(layers)])
  assert reordered[0].name == 'classifier'
  with pytest.raises(ValueError, match='must list each kernel module once'):
    presets.model_layers(dscnn_params, ['conv0'])


def test_tte_scheme_biases_of_last_k_and_chosen_weights(dscnn_params):
  scheme = presets.get_rules('tte', dscnn_params, bias_k=2,
                             weight_layers=('pw4', 'dw4'),
                             weight_fraction={'pw4': 0.25, 'dw4': 1.0})
  assert _paths(dscnn_params, scheme) == (
      'classifier/bias', 'classifier/kernel', 'dw4/kernel', 'pw4/bias',
      'pw4/kernel', 'pw4_norm/bias')
  assert rules.channel_fractions(dscnn_params, scheme) == {'pw4/kernel': 0.25}
  with pytest.raises(ValueError, match="weight_layers \\['pw9'\\]"):
    presets.get_rules('tte', dscnn_params, weight_layers=('pw9',))


def test_describe_counts_fractional_channels(dscnn_params):
  # pw1..pw4 kernels are 1x1x64x64; a quarter of their channels trains.
  scheme = [('pw[0-9]/kernel', 0.25), ('.*', None)]
  info = rules.describe(dscnn_params, scheme)
  assert info['num_trainable'] == 4 * 64 * 64 // 4


@pytest.mark.parametrize('call,match', [
    (lambda p: presets.get_rules('everything'), "valid names are \\('full'"),
    (lambda p: presets.get_rules('last_k', k=2), 'get_rules'),
    (lambda p: presets.get_rules('last_k', p, k=11), '1 <= k <= 10'),
    (lambda p: presets.get_rules('bias_only', p, kk=1), "accepts \\['head'\\]"),
    (lambda p: presets.get_rules('sparse_channels', p, fraction=0),
     'fraction must lie'),
])
def test_preset_errors_say_how_to_fix(dscnn_params, call, match):
  with pytest.raises(ValueError, match=match):
    call(dscnn_params)


def test_trainable_paths_plug_into_the_train_step():
  model = models.build_model('mlp', 3, hidden=(8,))
  scheme = presets.get_rules('bias_only')
  opt = optax.adam(1e-2)
  x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      jax.eval_shape(model.init, jax.random.key(0), x[:1])['params'])
  state = train.state_from_params(params, {}, opt, rules.as_predicate(scheme))
  paths = rules.trainable_paths(state.params, scheme)
  assert paths == ('classifier/bias', 'classifier/kernel', 'hidden1/bias')
  # Adam's moments exist for exactly the trainable leaves.
  assert set(state.opt_state[0].mu) == set(paths)
  step = jax.jit(train.make_train_step(train.classification_loss(model), opt,
                                       paths))
  batch = {'x': x, 'y': (x[:, 0] > 0).astype(np.int32),
           'mask': np.ones(16, np.float32)}
  new, _ = step(state, batch, jax.random.key(1))
  old_flat = train.flatten_params(state.params)
  new_flat = train.flatten_params(new.params)
  np.testing.assert_array_equal(new_flat['hidden1/kernel'],
                                old_flat['hidden1/kernel'])
  assert not np.array_equal(new_flat['hidden1/bias'], old_flat['hidden1/bias'])


def test_resolve_gives_paths_and_channel_masks(dscnn_params):
  bias = presets.resolve('bias_only', dscnn_params)
  assert bias.masks is None
  assert bias.paths == _paths(dscnn_params, presets.get_rules('bias_only'))
  last2 = presets.resolve('last_k', dscnn_params, k=2)
  # The last two layers are pw4 (+ its norm) and the classifier.
  assert last2.paths == ('classifier/bias', 'classifier/kernel',
                         'pw4/bias', 'pw4/kernel', 'pw4_norm/bias',
                         'pw4_norm/scale')
  # Magnitude masks need values: random leaves, in the same (layer) order.
  flat = {path: np.random.default_rng(i).normal(size=leaf.shape)
          for i, (path, leaf) in enumerate(
              train.flatten_params(dscnn_params).items())}
  half = presets.resolve('sparse_channels', train.unflatten_params(flat),
                         fraction=0.5)
  assert half.masks and set(half.masks) <= set(half.paths)
  for path, mask in half.masks.items():
    # Output channels are the last axis; half of them train.
    assert mask.shape[-1] == flat[path].shape[-1]
    assert int(np.sum(mask)) == flat[path].shape[-1] // 2
  with pytest.raises(ValueError, match='takes no argument'):
    presets.resolve('bias_only', dscnn_params, k=2)
