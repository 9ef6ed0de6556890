"""Verified pseudo-labels, templates, FAR calibration and label quality."""
import jax.numpy as jnp
import numpy as np
import pytest

from continual import pseudo_label as pl


def test_accepts_only_confident_and_verified_clips():
  big = 10.0
  # Clip 0: confident class 1, similar to template 1 -> accepted.
  # Clip 1: confident class 2, but unlike template 2 -> verification rejects.
  # Clip 2: unsure (uniform logits), similar to template 0 -> rejected.
  # Clip 3: confident class 0, similar only to template 2: the similarity of
  #         the *predicted* keyword counts, so it is rejected.
  logits = jnp.array([[0, big, 0], [0, 0, big], [0, 0, 0], [big, 0, 0]],
                     jnp.float32)
  scores = jnp.array([[0.1, 0.9, 0.2], [0.3, 0.2, 0.4], [0.95, 0.1, 0.1],
                      [0.1, 0.2, 0.99]])
  out = pl.pseudo_label(logits, scores, confidence=0.9, threshold=0.8)
  np.testing.assert_array_equal(out.labels, [1, 2, 0, 0])
  np.testing.assert_array_equal(out.accepted, [True, False, False, False])
  np.testing.assert_allclose(out.similarity, [0.9, 0.4, 0.95, 0.1])
  # softmax([10, 0, 0]) peaks at 1 / (1 + 2 e^-10); uniform at 1/3.
  np.testing.assert_allclose(np.asarray(out.confidence)[[0, 2]],
                             [1 / (1 + 2 * np.exp(-big)), 1 / 3], rtol=1e-6)
  unverified = pl.pseudo_label(logits, scores, 0.9, 0.8, verify=False)
  np.testing.assert_array_equal(unverified.accepted, [True, True, False, True])


def test_templates_are_centred_prototypes():
  emb = jnp.array([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
  labels = jnp.array([0, 0, 1, 1])
  t = pl.build_templates(emb, labels, num_classes=3)
  np.testing.assert_allclose(t.centre, [1.5, 1.0])
  np.testing.assert_array_equal(t.counts, [2, 2, 0])
  # Centred: (0.5, -1), (2.5, -1), (-1.5, 2), (-1.5, 0); unit vectors summed.
  unit = lambda v: np.asarray(v) / np.linalg.norm(v)
  np.testing.assert_allclose(t.sums[0], unit([.5, -1]) + unit([2.5, -1]),
                             rtol=1e-6)
  query = jnp.array([[3.0, 1.0]])  # Centred: (1.5, 0).
  scores = np.asarray(pl.template_scores(t, query))
  assert scores[0, 0] == pytest.approx(
      float(unit([1.5, 0]) @ unit(unit([.5, -1]) + unit([2.5, -1]))),
      rel=1e-6)
  assert scores[0, 2] == -np.inf  # Keyword 2 was never enrolled.


def test_enrollment_trials_leave_one_out():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(9, 4)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])
  t = pl.build_templates(emb, labels, num_classes=4)
  genuine, impostor = pl.enrollment_trials(t, emb, labels)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  centred = unit(emb - emb.mean(0))
  for i in range(len(emb)):
    same = [j for j in range(len(emb)) if labels[j] == labels[i] and j != i]
    if same:
      proto = unit(centred[same].sum(0))
      assert float(genuine[i]) == pytest.approx(float(centred[i] @ proto),
                                                abs=1e-5)
    else:
      assert np.isnan(genuine[i])  # Keyword 3 has one utterance only.
    others = [c for c in range(4) if c != labels[i]]
    want = [centred[i] @ unit(centred[labels == c].sum(0)) for c in others]
    np.testing.assert_allclose(impostor[i], want, atol=1e-5)


@pytest.mark.parametrize('target', [0.0, 0.01, 0.05, 0.2])
def test_threshold_hits_the_target_far(target):
  scores = np.random.default_rng(1).normal(size=5000)
  threshold = pl.calibrate_threshold(scores, target)
  far = pl.false_accept_rate(scores, threshold)
  # Continuous scores have no ties: exactly floor(target * n) accepted.
  assert far == np.floor(target * 5000) / 5000
  # The threshold is the lowest such: one notch lower accepts one more.
  assert pl.false_accept_rate(scores, np.nextafter(threshold, -np.inf)) > far


def test_threshold_with_ties_and_infinities_stays_below_target():
  scores = np.array([0.5] * 10 + [0.1] * 90 + [-np.inf] * 50)
  threshold = pl.calibrate_threshold(scores, 0.05)
  # 5% of 100 finite scores would be 5, but the top 10 tie: none is taken.
  assert pl.false_accept_rate(scores, threshold) == 0.0
  assert threshold > 0.5
  with pytest.raises(ValueError, match='two keywords'):
    pl.calibrate_threshold(np.array([-np.inf]), 0.01)
  with pytest.raises(ValueError, match='target_far'):
    pl.calibrate_threshold(scores, 1.5)


def test_label_quality_by_hand():
  labels = np.array([1, 2, 3, 0, 1])
  accepted = np.array([True, True, True, False, True])
  truth = np.array([1, 2, 0, 0, -1])       # The last clip has no keyword.
  positive = np.array([True, True, True, True, False])
  q = pl.label_quality(labels, accepted, truth, positive)
  # Accepted 4, correct 2 (clips 0 and 1); positives 4, of which 2 correct.
  assert q == {'precision': 0.5, 'recall': 0.5, 'accepted': 4.0,
               'correct': 2.0, 'positives': 4.0}
  none = pl.label_quality(labels, np.zeros(5, bool), truth, positive)
  assert none['precision'] == 1.0 and none['recall'] == 0.0
