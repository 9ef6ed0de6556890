"""Tests of few_shot.detection and few_shot.personalize."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from few_shot import detection
from few_shot import enrollment
from few_shot import personalize
from ondevice import models
from ondevice import train

# Keywords 0 and 1; word 2 is a non-keyword. Columns: p_0, p_1, p_2.
LABELS = np.array([0, 0, 1, 1, 2, 2, 2, 2])
PROBS = np.array([[0.9, 0.05, 0.05],   # keyword 0 -> fires 0 at 0.9
                  [0.4, 0.5, 0.1],     # keyword 0 -> fires 1: a miss
                  [0.2, 0.7, 0.1],     # keyword 1 -> fires 1 at 0.7
                  [0.15, 0.45, 0.4],   # keyword 1 -> fires 1 at 0.45
                  [0.6, 0.1, 0.3],     # non-keyword -> fires 0 at 0.6
                  [0.1, 0.5, 0.4],     # non-keyword -> fires 1 at 0.5
                  [0.1, 0.1, 0.8],     # non-keyword -> predicts 2: silent
                  [0.3, 0.2, 0.5]], np.float32)


_DETECT = jax.jit(detection.detection_at_far, static_argnums=4)


def _detect(far, mask=np.ones(8, np.float32)):
  out = _DETECT(PROBS, LABELS, mask, np.array([0, 1]), far)
  return {k: float(v) for k, v in out.items()}


def test_detection_rate_at_far_matches_a_hand_example():
  # Negatives' firing scores, highest first: 0.6, 0.5, -inf, -inf.
  out = _detect(0.25)  # One false accept allowed: threshold 0.5.
  assert out['threshold'] == pytest.approx(0.5)
  # Fires above 0.5: u0 (right), u2 (right), u4 (false accept).
  assert out['detection_rate'] == pytest.approx(2 / 4)
  assert out['false_accept_rate'] == pytest.approx(1 / 4)
  assert (out['num_positive'], out['num_negative']) == (4, 4)
  out = _detect(0.0)  # None allowed: threshold 0.6.
  assert out['threshold'] == pytest.approx(0.6)
  assert out['false_accept_rate'] == 0.0
  assert out['detection_rate'] == pytest.approx(2 / 4)
  # Two allowed: the third-highest score is -inf, so every keyword
  # prediction fires; u1 fires the wrong keyword and stays a miss.
  out = _detect(0.5)
  assert out['threshold'] == -np.inf
  assert out['detection_rate'] == pytest.approx(3 / 4)
  assert out['false_accept_rate'] == pytest.approx(2 / 4)
  # Masking u4 leaves three negatives (0.5, -inf, -inf): one allowed.
  out = _detect(0.34, mask=np.array([1, 1, 1, 1, 0, 1, 1, 1], np.float32))
  assert out['threshold'] == -np.inf
  assert out['detection_rate'] == pytest.approx(3 / 4)
  assert out['false_accept_rate'] == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match='far must lie'):
    detection.threshold_at_far(jnp.zeros(3), 1.0)


ANGLES = np.array([0.0, 2.1, 4.2])
MEANS = 2.0 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)


def _blobs(rng, n_per_class, rotation):
  """Three Gaussian classes in 2-D, rotated by `rotation` radians."""
  y = np.repeat(np.arange(3), n_per_class).astype(np.int32)
  x = MEANS[y] + 0.4 * rng.normal(size=(len(y), 2))
  turn = np.array([[np.cos(rotation), -np.sin(rotation)],
                   [np.sin(rotation), np.cos(rotation)]])
  return (x @ turn.T).astype(np.float32), y


def test_personalisation_improves_held_out_accuracy_under_a_user_shift():
  # The "global model" is the nearest-class-mean linear classifier of the
  # unrotated classes (logits x . mean_c, every mean of norm 2); words 0
  # and 1 are keywords, word 2 is the non-keyword.
  model = models.build_model('mlp', 3, hidden=())
  loss_fn = train.classification_loss(model)
  params = {'classifier': {'kernel': jnp.asarray(MEANS.T, jnp.float32),
                           'bias': jnp.zeros(3)}}
  # Two users whose "accent" rotates the feature space by ~70 degrees.
  ux, uy = _blobs(np.random.default_rng(0), 30, rotation=1.2)
  client_id = (np.arange(len(uy)) % 2).astype(np.int32)
  table = enrollment.enrollment_table(ux, uy, client_id, keywords=[0, 1],
                                      pool_size=5)
  tasks = enrollment.all_enrollment_tasks(table, jax.random.key(2), k_shot=5)
  state = personalize.as_state(params)
  before = personalize.make_user_evaluator(
      model, personalize.no_adaptation(), far=0.1)(
          state, tasks, jax.random.key(3))
  after = personalize.make_user_evaluator(
      model, personalize.finetune_adapter(loss_fn, optax.sgd(0.5), 20),
      far=0.1)(state, tasks, jax.random.key(3))
  assert (after['keyword_accuracy'] > before['keyword_accuracy'] + 0.2).all()
  assert (after['detection_rate'] > before['detection_rate'] + 0.2).all()
  assert (after['false_accept_rate'] <= 0.1).all()
  summary = personalize.group_summary(
      {k: np.asarray(v) for k, v in after.items()}, np.array([False, True]))
  assert summary['outlier']['num_users'] == 1
  assert summary['all']['detection_rate'] == pytest.approx(
      float(np.mean(after['detection_rate'])))
