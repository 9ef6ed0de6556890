"""The per-user loop on a tiny model, and the config's variants."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import continual_kws
from continual import experiment
from continual import learner
from continual import objectives
from continual import regularizers
from continual import streams
from continual import tta
from ondevice import models
from ondevice import train

NUM_CLASSES = 3


def _data(n, seed):
  """Clips [n, 6, 4] whose class shifts one band."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  x = rng.normal(size=(n, 6, 4)).astype(np.float32)
  x[np.arange(n), :, y] += 2.0
  return x, y


@pytest.fixture(scope='module')
def setup():
  model = models.build_model('mlp', NUM_CLASSES, hidden=(8,), norm='batch')
  variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 6, 4))))
  params = variables.pop('params')
  opt = optax.adam(1e-2)
  loss = regularizers.with_distillation(
      objectives.frozen_stats_loss(model), objectives.logits_fn(model),
      params, variables)
  logits = objectives.logits_fn(model)
  fns = learner.Functions(
      classify=jax.jit(lambda p, s, x: logits(p, s, x, None)),
      embed=jax.jit(objectives.embedding_fn(model)),
      train_step=jax.jit(train.make_train_step(
          objectives.with_augmentation(loss, time_mask=2, freq_mask=1,
                                       max_shift=1), opt)),
      enroll_step=None,
      tent_step=jax.jit(tta.make_tent_step(model, opt, params)),
      adapt_bn=jax.jit(lambda p, s, x, m: tta.adapt_batch_norm(
          model, p, s, x, 4.0, m)))
  enroll_x, enroll_y = _data(12, 1)
  pools = {'user_keyword': _data(30, 2), 'user_other_word': _data(10, 3),
           'other_speaker': _data(10, 4), 'noise': _data(10, 5)}
  pools['user_other_word'] = (pools['user_other_word'][0],
                              np.full(10, -1, np.int32))
  pools['noise'] = (pools['noise'][0], np.full(10, -1, np.int32))
  stream = streams.make_stream(pools, 48, jax.random.key(3))
  verifier = learner.calibrate_verifier(fns.embed, params, variables,
                                        enroll_x, enroll_y, NUM_CLASSES, 0.2,
                                        batch_size=8)
  emb = learner.batched(lambda b: fns.embed(params, variables, b), stream.x,
                        16)
  from continual import pseudo_label  # pylint: disable=g-import-not-at-top
  scores = np.asarray(pseudo_label.template_scores(verifier.templates, emb))
  eval_fn = jax.jit(train.make_eval_step(model))
  test_x, test_y = _data(16, 6)

  def evaluate(p, s, level):
    del level
    acc = train.evaluate(eval_fn, p, s, test_x, test_y, 16)['accuracy']
    return {'user_accuracy': acc, 'global_accuracy': acc}
  return dict(model=model, params=params, state=variables, opt=opt, fns=fns,
              stream=stream, verifier=verifier, scores=scores,
              enroll=(enroll_x, enroll_y), evaluate=evaluate)


def _run(s, settings, state=None, verifier=None, key=0):
  state = state or train.state_from_params(s['params'], s['state'], s['opt'])
  return learner.run_stream(
      s['fns'], settings, state, s['stream'], 16, verifier or s['verifier'],
      s['scores'], *s['enroll'], s['evaluate'], jax.random.key(key))


def test_pseudo_label_stream_is_deterministic_and_consistent(setup):
  settings = learner.Settings(steps_per_chunk=2, batch_size=8,
                              distill_batch_size=4, replay_capacity=16,
                              confidence=0.4)
  curve, quality, final = _run(setup, settings)
  again, quality2, final2 = _run(setup, settings)
  assert [p['chunk'] for p in curve] == [0, 1, 2, 3]
  assert curve[-1]['clips'] == 48
  assert curve == again and quality == quality2
  for a, b in zip(jax.tree.leaves(final.params),
                  jax.tree.leaves(final2.params)):
    np.testing.assert_array_equal(a, b)
  by_source = quality['by_source']
  assert sum(v['accepted'] for v in by_source.values()) == quality['accepted']
  assert sum(v['clips'] for v in by_source.values()) == 48
  assert quality['accepted'] > 0
  assert int(final.step) > 0


def test_nothing_verified_means_nothing_learned(setup):
  """A threshold no clip reaches: no step runs, so params stay put.

  Replay is off: the buffer's enrollment clips would otherwise train.
  """
  verifier = setup['verifier']._replace(threshold=np.inf)
  settings = learner.Settings(steps_per_chunk=2, batch_size=8,
                              replay_capacity=0, confidence=0.0)
  curve, quality, final = _run(setup, settings, verifier=verifier)
  assert quality['accepted'] == 0 and quality['precision'] == 1.0
  assert int(final.step) == 0
  for a, b in zip(jax.tree.leaves(final.params),
                  jax.tree.leaves(setup['params'])):
    np.testing.assert_array_equal(a, b)
  assert curve[0]['user_accuracy'] == curve[-1]['user_accuracy']


def test_bn_adapt_and_tent_baselines_run(setup):
  settings = learner.Settings(method='bn_adapt', bn_window=32)
  _, quality, final = _run(setup, settings)
  assert quality['accepted'] == 0
  assert not np.array_equal(
      final.model_state['batch_stats']['hidden1_norm']['mean'],
      setup['state']['batch_stats']['hidden1_norm']['mean'])
  tent_state = train.state_from_params(setup['params'], setup['state'],
                                       setup['opt'],
                                       tta.norm_paths(setup['params']))
  settings = learner.Settings(method='tent', steps_per_chunk=1, batch_size=8)
  _, _, final = _run(setup, settings, state=tent_state)
  np.testing.assert_array_equal(final.params['classifier']['kernel'],
                                setup['params']['classifier']['kernel'])
  with pytest.raises(ValueError, match='one of'):
    learner.Settings(method='fixmatch')


def test_config_variants_merge_and_validate():
  config = continual_kws.get_config()
  assert config.main_variant in config.variants
  merged = experiment.variant_config(config, 'no_verification')
  assert merged.pseudo.verify is False
  assert merged.regularizer.name == config.regularizer.name
  assert 'variants' not in merged
  ewc = experiment.variant_config(config, 'verified+ewc')
  assert (ewc.regularizer.name == 'ewc' and
          ewc.learner.method.name == 'pseudo_label')
  config.variants.bad = {'pseudo': {'verifiy': False}}
  with pytest.raises(ValueError, match='pseudo.verifiy'):
    experiment.variant_config(config, 'bad')
  with pytest.raises(ValueError, match='Unknown config argument'):
    continual_kws.get_config('smoek')
  smoke = continual_kws.get_config('smoke')
  assert smoke.main_variant in smoke.variants
  # The smoke stream fits its pools (see streams.make_stream).
  counts = streams.source_counts(smoke.stream.length, smoke.stream.mix)
  per_word = (smoke.users.utterances_per_word - smoke.users.num_enroll -
              smoke.users.num_test)
  assert counts[0] <= 36 * per_word
  assert counts[3] <= smoke.users.num_noise
  # The tent variant inherits nothing of pseudo-labelling's teacher.
  tent = experiment._settings(experiment.variant_config(smoke, 'tent'))
  assert tent.method == 'tent' and not tent.teacher_bn
  with pytest.raises(ValueError, match='teacher_bn applies to method'):
    learner.Settings(method='tent', teacher_bn=True)


def test_recent_window_pads_and_masks(setup):
  stream = setup['stream']
  x, mask = learner._recent(stream, 5, 8)
  np.testing.assert_array_equal(x[:5], stream.x[:5])
  np.testing.assert_array_equal(x[5:], 0.0)
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0, 0, 0])
  x, mask = learner._recent(stream, 40, 8)
  np.testing.assert_array_equal(x, stream.x[32:40])
  assert mask.sum() == 8


def test_teacher_bn_with_source_statistics_changes_nothing(setup):
  """Statistics that stay the source's (N = inf) label exactly as without.

  The verifier then embeds with the enrolled params and source statistics,
  which is how `setup['scores']` were computed.
  """
  settings = learner.Settings(steps_per_chunk=2, batch_size=8,
                              replay_capacity=16, confidence=0.4)
  curve, quality, final = _run(setup, settings)
  keep = dict(setup, fns=setup['fns']._replace(
      adapt_bn=lambda p, s, x, m: s))
  curve2, quality2, final2 = _run(
      keep, dataclasses.replace(settings, teacher_bn=True))
  with pytest.raises(ValueError, match='adapt_bn'):
    _run(dict(setup, fns=setup['fns']._replace(adapt_bn=None)),
         dataclasses.replace(settings, teacher_bn=True))
  assert quality == quality2
  np.testing.assert_allclose([p['user_accuracy'] for p in curve],
                             [p['user_accuracy'] for p in curve2])
  for a, b in zip(jax.tree.leaves(final.params),
                  jax.tree.leaves(final2.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_teacher_bn_follows_a_shift_the_source_statistics_miss(setup):
  """Clips shifted by a constant: adapted statistics undo the shift.

  A model trained on unshifted clips labels the shifted stream with its
  source statistics poorly; with statistics of the shifted clips themselves
  (N = 0) its first batch norm sees what it saw in training. The student
  keeps training with the source statistics.
  """
  model = setup['model']
  state = train.init_state(model, optax.adam(1e-2), jnp.zeros((1, 6, 4)),
                           jax.random.key(1))
  step = jax.jit(train.make_train_step(train.classification_loss(model),
                                       optax.adam(1e-2)))
  x, y = _data(256, 7)
  for i in range(60):
    part = slice(32 * (i % 8), 32 * (i % 8 + 1))
    state, _ = step(state, {'x': x[part], 'y': y[part],
                            'mask': np.ones(32, np.float32)},
                    jax.random.key(i))
  shifted = dataclasses.replace(setup['stream'],
                                x=setup['stream'].x + 3.0)
  fns = setup['fns']._replace(adapt_bn=jax.jit(
      lambda p, s, x, m: tta.adapt_batch_norm(model, p, s, x, 0.0, m)))
  s = dict(setup, stream=shifted, fns=fns)
  settings = learner.Settings(steps_per_chunk=1, batch_size=8,
                              replay_capacity=0, confidence=0.0,
                              verify=False, bn_window=48)
  start = train.state_from_params(state.params, state.model_state,
                                  setup['opt'])
  _, plain, _ = _run(s, settings, state=start)
  _, adapted, final = _run(s, dataclasses.replace(settings, teacher_bn=True),
                           state=start)
  # Everything is accepted; 24 + 10 of the 48 clips (user keywords and
  # other speakers, streams.source_counts) hold a keyword.
  assert plain['accepted'] == adapted['accepted'] == 48
  assert np.sum(shifted.label >= 0) == 34
  assert adapted['precision'] > plain['precision'] + 0.1
  assert adapted['precision'] <= 34 / 48
  np.testing.assert_array_equal(
      final.model_state['batch_stats']['hidden1_norm']['mean'],
      state.model_state['batch_stats']['hidden1_norm']['mean'])


def _nan_step(state, batch, key):
  del batch, key
  return state, {'loss': jnp.float32(jnp.nan)}


def test_non_finite_loss_stops_naming_the_chunk_and_step(setup):
  settings = learner.Settings(steps_per_chunk=2, batch_size=8,
                              replay_capacity=16, confidence=0.0,
                              verify=False)
  nan_fns = setup['fns']._replace(train_step=_nan_step, tent_step=_nan_step)
  with pytest.raises(FloatingPointError, match='stream chunk 1, step 0'):
    _run(dict(setup, fns=nan_fns), settings)
  tent = learner.Settings(method='tent', steps_per_chunk=1, batch_size=8)
  with pytest.raises(FloatingPointError, match='chunk 1, TENT step 0'):
    _run(dict(setup, fns=nan_fns), tent)
  state = train.state_from_params(setup['params'], setup['state'],
                                  setup['opt'])
  with pytest.raises(FloatingPointError, match='enrollment step 0'):
    learner.enroll(_nan_step, state, *setup['enroll'], 3, 4,
                   jax.random.key(0))


def test_enroll_sees_every_clip_once_per_epoch():
  """6 clips, batches of 4, 3 steps: 12 rows, so every clip exactly twice."""
  seen = []

  def record(state, batch, key):
    del key
    seen.extend(int(v) for v in batch['y'])
    return state, {'loss': jnp.float32(0.0)}
  x = np.zeros((6, 2), np.float32)
  learner.enroll(record, None, x, np.arange(6, dtype=np.int32), 3, 4,
                 jax.random.key(5))
  assert len(seen) == 12
  assert sorted(seen[:6]) == list(range(6)) == sorted(seen[6:])
