"""Tests of FedUV (fedjax_ext.verification*) and the verification splits."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import feduv_kws
from fedjax_ext import codes
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import training
from fedjax_ext import verification
from fedjax_ext.feduv import experiment
from fedjax_ext.feduv import report
from fedjax_ext.feduv import scoring
from fedjax_ext.feduv import trainers
from fedjax_ext.feduv import variants
from ondevice import train
import quantized_training
from ondevice.data import verification as verification_data
from ondevice.data.base import ArrayDataset

# ---------------------------------------------------------------- metrics

GENUINE = np.array([0.9, 0.8, 0.7, 0.6])
IMPOSTOR = np.array([0.65, 0.5, 0.4, 0.3])


def test_roc_points_by_hand():
  far, tpr, thresholds = verification.roc_curve(GENUINE, IMPOSTOR)
  # Accept score >= 0.9, 0.8, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3 in turn.
  np.testing.assert_allclose(tpr, [0, .25, .5, .75, .75, 1, 1, 1, 1])
  np.testing.assert_allclose(far, [0, 0, 0, 0, .25, .25, .5, .75, 1])
  assert thresholds[0] == np.inf and thresholds[4] == 0.65


def test_eer_and_tpr_at_far_by_hand():
  # At threshold 0.65: FAR = 1/4, FRR = 1/4.
  assert verification.equal_error_rate(GENUINE, IMPOSTOR) == pytest.approx(.25)
  assert verification.tpr_at_far(GENUINE, IMPOSTOR, 0.0) == 0.75
  assert verification.tpr_at_far(GENUINE, IMPOSTOR, 0.1) == 0.75
  assert verification.tpr_at_far(GENUINE, IMPOSTOR, 0.25) == 1.0
  # ROC (0,0) (0,.5) (1,.5) (1,1): FAR - FRR goes -.5 -> +.5 at FAR 0 -> 1.
  assert verification.equal_error_rate([1.0, 0.0], [0.5]) == pytest.approx(.5)
  # Ties count once: one point (1, 1).
  far, tpr, _ = verification.roc_curve([0.5], [0.5])
  np.testing.assert_allclose(np.stack([far, tpr]), [[0, 1], [0, 1]])
  with pytest.raises(ValueError, match='at least one'):
    verification.roc_curve([], [0.1])


def test_warmup_thresholds_hit_the_target_tpr():
  scores = np.r_[np.arange(1, 11) / 10, [1., 2., 3., 4.]]
  users = np.r_[np.zeros(10, int), np.ones(4, int)]
  th = verification.warmup_thresholds(scores, users, 2, 0.9)
  # User 0: accept >= 0.2 keeps 9 of 10; user 1: floor(0.1 * 4) = 0 -> 1.
  np.testing.assert_allclose(th, [0.2, 1.0])
  th = verification.warmup_thresholds(scores, users, 2, 0.75)
  np.testing.assert_allclose(th, [0.3, 2.0])  # floor(2.5) = 2; floor(1) = 1.
  with pytest.raises(ValueError, match='no warm-up'):
    verification.warmup_thresholds(scores, users, 3, 0.9)


def test_trials_and_per_user_operating_point():
  seen = np.array([[0.9, 0.2], [0.4, 0.6], [0.1, 0.3]])
  users = np.array([0, 1, 1])
  unseen = np.array([[0.5, 0.7]])
  trials = verification.trial_scores(seen, users, unseen)
  np.testing.assert_allclose(trials['genuine'], [0.9, 0.6, 0.3])
  np.testing.assert_allclose(np.sort(trials['impostor_seen']), [0.1, 0.2,
                                                                0.4])
  assert trials['impostor'].size == 5
  point = verification.per_user_operating_point(seen, users, unseen,
                                                np.array([0.5, 0.5]))
  # Genuine accepted: 0.9, 0.6 of 3; impostors accepted: 0.5 and 0.7 of 5.
  assert point['tpr'] == pytest.approx(2 / 3)
  assert point['far'] == pytest.approx(2 / 5)
  assert point['far_unseen_impostors'] == 1.0


def test_references_and_scores():
  emb = np.array([[1., 0.], [0., 1.], [3., 0.]])
  refs = verification.mean_references(emb, np.array([0, 0, 1]), 2)
  np.testing.assert_allclose(refs, [[2 ** -.5, 2 ** -.5], [1., 0.]])
  with pytest.raises(ValueError, match='enrollment'):
    verification.mean_references(emb, np.array([0, 0, 0]), 2)
  code_refs = verification.codeword_references(np.array([[1., -1., 1., 1.]]))
  np.testing.assert_allclose(
      verification.score_matrix(np.array([[.5, -.5, .5, .5]]), code_refs),
      [[1.0]])


# ---------------------------------------------------------------- losses


def _tiny_feduv(n=15):
  return verification.build_verifier('feduv', 'mlp', embedding_dim=n,
                                     num_users=3, hidden=(8,), norm='none')


def test_feduv_loss_is_one_minus_cosine_with_own_codeword():
  model = _tiny_feduv()
  code = codes.bch_code(4, 2)
  words = codes.to_signs(codes.user_codewords(code, [0, 1, 2], 3,
                                              jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (4, 4, 3))
  state = train.init_state(model, optax.sgd(0.1), x, jax.random.key(2))
  batch = {'x': x, 'y': jnp.array([0, 2, 1, 0]),
           'mask': jnp.array([1., 1., 1., 0.])}
  loss_fn = jax.jit(verification.feduv_loss(model, words))
  loss, (sums, _) = loss_fn(state.params, state.model_state, batch,
                            jax.random.key(3))
  f = jax.jit(model.apply)({'params': state.params}, x)
  cos = np.sum(np.asarray(f) * words[[0, 2, 1, 0]] / np.sqrt(15), axis=1)
  assert float(loss) == pytest.approx(np.mean(1 - cos[:3]), abs=1e-5)
  assert float(sums['count']) == 3


def test_feduv_loss_rejects_mismatched_codeword_length():
  with pytest.raises(ValueError, match='code length'):
    verification.feduv_loss(_tiny_feduv(7), np.ones((3, 15), np.float32))
  with pytest.raises(ValueError, match='Unknown verifier'):
    verification.build_verifier('triplet', 'mlp', embedding_dim=4,
                                num_users=3)


class _CountingDot(nn.Module):
  """lax.dot_general that counts its calls (a `dot_general_cls` hook)."""

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None):
    self.sow('intermediates', 'calls', 1)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type)


def _hook_calls(model, variables, x):
  out, state = model.apply(variables, x, mutable=['intermediates'])
  return out, len(jax.tree.leaves(state['intermediates']))


def test_quant_hook_reaches_every_matmul_of_both_models():
  x = jax.random.normal(jax.random.key(0), (3, 4, 3))
  counts = {}
  for kind in ('feduv', 'softmax'):
    kw = dict(embedding_dim=15, num_users=3, hidden=(8,), norm='none')
    plain = verification.build_verifier(kind, 'mlp', **kw)
    hooked = verification.build_verifier(kind, 'mlp', **kw,
                                         dot_general_cls=_CountingDot)
    variables = hooked.init(jax.random.key(1), x)
    out, counts[kind] = _hook_calls(hooked, variables, x)
    # The counting hook computes what lax does: the same outputs.
    np.testing.assert_allclose(
        out, plain.apply({'params': variables['params']}, x), rtol=1e-6)
  # MLP hidden layer and projection; the softmax model adds its classifier.
  assert counts == {'feduv': 2, 'softmax': 3}


def test_stochastically_rounded_int8_feduv_loss_takes_a_step():
  # Stochastic rounding draws from the 'quant' stream the loss must pass.
  hooks = quantized_training.get_quant('int8_fwd_bwd_sr').model_kwargs()
  model = verification.build_verifier('feduv', 'mlp', embedding_dim=15,
                                      num_users=3, hidden=(8,), norm='none',
                                      **hooks)
  words = codes.to_signs(codes.user_codewords(
      codes.bch_code(4, 2), [0, 1, 2], 3, jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (4, 4, 3))
  state = train.init_state(model, optax.sgd(0.1), x, jax.random.key(2))
  step = jax.jit(train.make_train_step(
      verification.feduv_loss(model, words), optax.sgd(0.1)))
  batch = {'x': x, 'y': jnp.array([0, 1, 2, 0]), 'mask': jnp.ones(4)}
  new, metrics = step(state, batch, jax.random.key(3))
  assert np.isfinite(float(metrics['loss']))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       new.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0


# ---------------------------------------------------------------- splits


def _synthetic(num_speakers, per_speaker, seed, offset=0):
  rng = np.random.default_rng(seed)
  means = rng.normal(0, 1, (num_speakers, 4, 3)) * 3
  speaker = np.repeat(np.arange(num_speakers), per_speaker)
  x = (means[speaker] + rng.normal(0, .3, (len(speaker), 4, 3)))
  return ArrayDataset(x=x.astype(np.float32),
                      y=np.tile(np.arange(per_speaker) % 2, num_speakers),
                      client_id=(speaker + offset).astype(np.int32),
                      class_names=('yes', 'no'))


def test_split_utterances_partitions_every_user():
  ds, speakers = verification_data.relabel_by_speaker(_synthetic(3, 10, 0, 5))
  np.testing.assert_array_equal(speakers, [5, 6, 7])
  assert ds.meta['word'].tolist()[:3] == [0, 1, 0]
  train_ds, warm, test = verification_data.split_utterances(ds, .2, .2, 0)
  for part, n in ((train_ds, 6), (warm, 2), (test, 2)):
    np.testing.assert_array_equal(np.bincount(part.y), [n] * 3)
  ids = np.concatenate([p.x[:, 0, 0] for p in (train_ds, warm, test)])
  assert len(np.unique(ids)) == 30  # Disjoint and complete.
  with pytest.raises(ValueError, match='too few'):
    verification_data.split_utterances(ds, .02, .2, 0)
  with pytest.raises(ValueError, match='< 1'):
    verification_data.split_utterances(ds, .5, .5, 0)


# ---------------------------------------------------------------- end to end


def _tiny_config():
  config = feduv_kws.get_config('smoke')
  config.model = 'mlp'
  config.norm = 'none'
  config.model_kwargs = ml_collections.ConfigDict({'hidden': (16,)})
  config.cohort_size = 3
  config.num_rounds = 25
  config.eval_every = 25
  config.local.num_steps = 4
  config.algorithm.name = 'fedavg'  # Pinned: independent of the full config.
  config.feduv_margin = 1.0
  config.client_learning_rate = 0.1
  config.client_momentum = 0.9
  return config


def test_config_errors_name_the_key():
  config = _tiny_config()
  config.variants = 'feduv,arcface'
  with pytest.raises(ValueError, match='arcface'):
    experiment.validate_config(config)
  config = _tiny_config()
  del config['fars']
  with pytest.raises(ValueError, match='fars'):
    experiment.validate_config(config)
  config = _tiny_config()
  config.dp.delta = 2.0
  config.variants = 'feduv_dp'
  with pytest.raises(ValueError, match='delta'):
    experiment.validate_config(config)
  config = _tiny_config()
  config.feduv_references = ('codewords',)
  with pytest.raises(ValueError, match='feduv_references'):
    experiment.validate_config(config)
  with pytest.raises(ValueError, match='smoke'):
    feduv_kws.get_config('smok')


def _splits(num_seen, num_unseen, per_speaker):
  """Verification splits of `_synthetic` speakers (seed 0 seen, 1 unseen)."""
  seen, speakers = verification_data.relabel_by_speaker(
      _synthetic(num_seen, per_speaker, 0))
  unseen, others = verification_data.relabel_by_speaker(
      _synthetic(num_unseen, per_speaker, 1, offset=num_seen))
  train_ds, warm, test = verification_data.split_utterances(seen, .2, .2, 0)
  return verification_data.VerificationSplits(train_ds, warm, test, unseen,
                                              speakers, others)


def test_feduv_learns_separable_speakers_end_to_end(tmp_path):
  splits = _splits(6, 2, 12)
  train_ds = splits.train
  config = _tiny_config()
  code = codes.bch_code(4, 2)
  words = codes.user_codewords(code, np.arange(6), 6, jax.random.key(0))
  model = _tiny_feduv()
  params = train.init_state(model, optax.sgd(1.), train_ds.x[:1],
                            jax.random.key(1))
  before, _ = scoring.evaluate(
      config, 'feduv', model, params.params, {}, splits, words)
  rows, trials = experiment.run_variant(
      config, 'feduv', splits, words, jax.random.key(1),
      workdir=str(tmp_path))
  # Random W: chance level; trained: the 6 clusters (3 std apart) separate,
  # whether a user compares with its codeword or its mean embedding.
  assert before['eer'] > 0.2
  assert list(rows) == ['feduv', 'feduv_mean_ref']
  for name, row in rows.items():
    assert row['eer'] < 0.05 and row['tpr_at_far0.1'] > 0.95, name
    assert trials[name]['genuine'].size == 12
    assert trials[name]['impostor'].size == 12 * 5 + 24 * 6
    assert row['shares_class_embeddings'] is False
    assert row['trained_as'] == 'feduv'
  assert [rows[n]['reference'] for n in rows] == ['codeword', 'mean']
  # One trained model: the same parameters behind both rows, so the same
  # training loss; only the scores differ.
  assert (rows['feduv']['final_train_loss'] ==
          rows['feduv_mean_ref']['final_train_loss'])
  assert not np.allclose(trials['feduv']['genuine'],
                         trials['feduv_mean_ref']['genuine'])


def test_mean_reference_scores_by_hand():
  splits = _splits(3, 1, 10)
  train_ds, test = splits.train, splits.test
  model = _tiny_feduv()
  params = train.init_state(model, optax.sgd(1.), train_ds.x[:1],
                            jax.random.key(1)).params
  words = codes.user_codewords(codes.bch_code(4, 2), np.arange(3), 3,
                               jax.random.key(0))
  _, trials = scoring.evaluate(
      _tiny_config(), 'feduv', model, params, {}, splits, words,
      reference='mean')
  emb = lambda x: np.asarray(model.apply({'params': params}, x), np.float64)
  ref = np.stack([emb(train_ds.x[train_ds.y == u]).sum(0) for u in range(3)])
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  test_emb = emb(test.x)
  test_emb /= np.linalg.norm(test_emb, axis=1, keepdims=True)
  genuine = np.sum(test_emb * ref[test.y], axis=1)
  np.testing.assert_allclose(np.sort(trials['genuine']), np.sort(genuine),
                             atol=1e-5)
  with pytest.raises(ValueError, match='codeword references'):
    scoring.evaluate(_tiny_config(), 'softmax', model, params,
                                 {}, splits, words, reference='codeword')


def test_goals_pair_each_feduv_row_with_fed_softmax():
  rows = {'fed_softmax': {'eer': 0.1, 'tpr_at_far0.1': 0.9},
          'feduv': {'eer': 0.3, 'tpr_at_far0.1': 0.5},
          'feduv_mean_ref': {'eer': 0.12, 'tpr_at_far0.1': 0.85}}
  got = {g['goal']: (round(g['value'], 6), g['met'])
         for g in report.goals(rows)}
  assert got == {
      'EER(feduv) <= 1.5 x EER(fed_softmax)': (3.0, False),
      'TPR@FAR10% (feduv) > 0.8': (0.5, False),
      'EER(feduv_mean_ref) <= 1.5 x EER(fed_softmax)': (1.2, True),
      'TPR@FAR10% (feduv_mean_ref) > 0.8': (0.85, True)}
  assert variants.row_order(
      ['feduv_mean_ref', 'fed_softmax', 'feduv']) == [
          'fed_softmax', 'feduv', 'feduv_mean_ref']


def test_combine_refuses_runs_with_different_configs(tmp_path):
  for name, seed in (('a', 0), ('b', 1)):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'results.json').write_text(json.dumps(
        {'config': {'seed': seed, 'variants': 'feduv'}, 'variants': {}}))
  with pytest.raises(ValueError, match='seed'):
    report.combine([tmp_path / 'a', tmp_path / 'b'],
                                str(tmp_path / 'out'))


def _row(eer, tpr, trained_as, reference, **extra):
  return {'eer': eer, 'tpr_at_far0.01': tpr / 2, 'tpr_at_far0.1': tpr,
          'unseen_eer': eer, 'warmup_threshold_tpr': 0.9,
          'warmup_threshold_far': 0.2, 'shares_class_embeddings': False,
          'train_seconds': 1.0, 'trained_as': trained_as,
          'reference': reference, **extra}


def _fake_run(workdir, config, rows):
  """A finished run's results.json and trials, without training."""
  workdir.mkdir()
  res = {'code': {'n': 15, 'k': 7, 't': 2, 'min_distance_lower_bound': 5},
         'num_users': 2, 'num_unseen_speakers': 1,
         'utterances': {'train': 4, 'warmup': 2, 'test': 2, 'unseen': 3},
         'variants': rows, 'goals': report.goals(rows), 'config': config}
  trials = {name: {'genuine': np.array([0.9, 0.1 * i]),
                   'impostor': np.array([0.3, -0.2, 0.05 * i])}
            for i, name in enumerate(rows)}
  report.save_trials(trials, str(workdir))
  report.write_outputs(res, trials, str(workdir))
  return trials


def test_combine_merges_rows_in_variant_order(tmp_path):
  config = {'seed': 0, 'fars': [0.01, 0.1], 'target_tpr': 0.9,
            'variants': 'feduv'}
  uv = _fake_run(tmp_path / 'a', config, {
      'feduv': _row(0.3, 0.5, 'feduv', 'codeword'),
      'feduv_mean_ref': _row(0.12, 0.85, 'feduv', 'mean')})
  sm = _fake_run(tmp_path / 'b', dict(config, variants='fed_softmax'), {
      'fed_softmax': _row(0.1, 0.9, 'fed_softmax', 'mean',
                          dp_epsilon=float('inf'))})
  merged = report.combine([tmp_path / 'a', tmp_path / 'b'],
                          str(tmp_path / 'c'))
  assert list(merged['variants']) == ['fed_softmax', 'feduv',
                                      'feduv_mean_ref']
  assert merged['config']['variants'] == 'fed_softmax,feduv'
  # EER ratios 0.3 / 0.1 and 0.12 / 0.1, now that both sides are present.
  assert [round(g['value'], 6) for g in merged['goals']] == [3.0, 0.5, 1.2,
                                                             0.85]
  for name, trials in {**uv, **sm}.items():
    with np.load(tmp_path / 'c' / f'trials_{name}.npz') as z:
      np.testing.assert_array_equal(z['genuine'], trials['genuine'])
  # No noise: epsilon is infinite, written as a string JSON can hold.
  text = (tmp_path / 'c' / 'results.json').read_text()
  def no_constants(name):
    raise AssertionError(f'results.json holds the non-JSON {name}')
  res = json.loads(text, parse_constant=no_constants)
  assert res['variants']['fed_softmax']['dp_epsilon'] == 'inf'
  assert 'feduv_mean_ref' in (tmp_path / 'c' / 'results.md').read_text()
  assert (tmp_path / 'c' / 'roc.png').exists()


def test_central_training_that_diverges_stops_naming_the_step(tmp_path):
  splits = _splits(4, 1, 10)
  config = _tiny_config()
  config.central.learning_rate = 1e38  # Overflows the weights at once.
  config.central.num_steps = 3
  model = verification.build_verifier('softmax', 'mlp', embedding_dim=8,
                                      num_users=4, hidden=(8,), norm='none')
  state = train.init_state(model, optax.sgd(1.), splits.train.x[:1],
                           jax.random.key(0))
  with pytest.raises(FloatingPointError, match='non-finite at step'):
    trainers.train_central(config, verification.softmax_loss(model),
                           splits.train, state.params, state.model_state,
                           jax.random.key(1), workdir=str(tmp_path))


def _tiny_softmax_start(splits):
  model = verification.build_verifier('softmax', 'mlp', embedding_dim=8,
                                      num_users=splits.num_users,
                                      hidden=(8,), norm='none')
  state = train.init_state(model, optax.sgd(1.), splits.train.x[:1],
                           jax.random.key(0))
  return model, verification.softmax_loss(model), state


def test_central_trainer_repeats_a_plain_epoch_loop(tmp_path):
  splits = _splits(4, 1, 10)  # 24 train utterances: 3 batches an epoch.
  config = _tiny_config()
  config.central.num_steps = 7
  _, loss_fn, state = _tiny_softmax_start(splits)
  key = jax.random.key(1)
  got = trainers.train_central(config, loss_fn, splits.train, state.params,
                               state.model_state, key, workdir=str(tmp_path))
  # Reference: epoch e visits permutation(fold_in(data_key, e)) in slices.
  optimizer = optax.sgd(config.central.learning_rate,
                        momentum=config.central.momentum)
  ref = train.state_from_params(state.params, state.model_state, optimizer)
  step = jax.jit(train.make_train_step(loss_fn, optimizer))
  data_key, step_key = jax.random.split(key)
  n, b = len(splits.train), config.central.batch_size
  for s in range(config.central.num_steps):
    epoch, i = divmod(s, n // b)
    order = np.asarray(jax.random.permutation(
        jax.random.fold_in(data_key, epoch), n))[i * b:(i + 1) * b]
    batch = {'x': splits.train.x[order], 'y': splits.train.y[order],
             'mask': np.ones(b, np.float32)}
    ref, metrics = step(ref, batch, jax.random.fold_in(step_key, s))
  jax.tree.map(np.testing.assert_array_equal, got.params, ref.params)
  assert got.info['final_train_loss'] == float(metrics['loss'])


def test_federated_trainer_repeats_a_plain_round_loop(tmp_path):
  splits = _splits(4, 1, 10)
  config = _tiny_config()
  config.num_rounds = 3
  _, loss_fn, state = _tiny_softmax_start(splits)
  key = jax.random.key(1)
  got = trainers.train_federated(config, loss_fn, splits.train, state.params,
                                 state.model_state, key, dp=False,
                                 workdir=str(tmp_path))
  # Reference: round r samples, gathers and applies with fold_in(key, r).
  pool = cohort_lib.ClientPool.from_dataset(splits.train)
  algorithm = training.build_algorithm(config, loss_fn, pool.num_clients,
                                       None)
  ref = algorithm.init(state.params, state.model_state)
  losses = []
  for r in range(config.num_rounds):
    sample_key, gather_key, apply_key = jax.random.split(
        jax.random.fold_in(key, r), 3)
    ids = cohort_lib.sample_clients(sample_key, pool.sizes,
                                    config.cohort_size)
    cohort = cohort_lib.gather_cohort(splits.train, ids,
                                      config.max_examples_per_client,
                                      gather_key, pool)
    ref, metrics = algorithm.apply(ref, cohort, ids, apply_key)
    losses.append(float(metrics['train_loss']))
  jax.tree.map(np.testing.assert_array_equal, got.params, ref.params)
  assert got.info['train_loss_curve'] == losses
