"""Tests for ondevice.data.partition."""
import numpy as np
import pytest

from ondevice.data import partition
from ondevice.data.base import ArrayDataset

# Fashion-MNIST-like balanced labels: 10 classes x 6000.
_LABELS = np.repeat(np.arange(10), 6000).astype(np.int32)


def _loop_label_skew(labels, client_ids, num_classes):
  """Reference: a plain Python loop over clients."""
  global_dist = np.bincount(labels, minlength=num_classes) / len(labels)
  tvs = []
  for client in sorted(set(client_ids.tolist())):
    mine = labels[client_ids == client]
    dist = np.bincount(mine, minlength=num_classes) / len(mine)
    tvs.append(0.5 * sum(abs(a - b) for a, b in zip(dist, global_dist)))
  return sum(tvs) / len(tvs)


@pytest.mark.parametrize('alpha', [0.1, 1.0, 100.0])
def test_dirichlet_assigns_every_example_once(alpha):
  ids = partition.dirichlet_partition(_LABELS, 100, alpha, seed=0)
  assert ids.shape == _LABELS.shape and ids.dtype == np.int32
  assert ids.min() >= 0 and ids.max() < 100
  # An id per example means no example is lost or duplicated; the client
  # sizes add up to N and every client is non-empty (min_examples=1).
  sizes = np.bincount(ids, minlength=100)
  assert sizes.sum() == len(_LABELS) and sizes.min() >= 1
  # Class totals are preserved per class.
  counts = partition.client_label_counts(_LABELS, ids, 10)
  np.testing.assert_array_equal(counts.sum(0), np.full(10, 6000))


def test_dirichlet_is_reproducible():
  a = partition.dirichlet_partition(_LABELS, 50, 0.5, seed=3)
  b = partition.dirichlet_partition(_LABELS, 50, 0.5, seed=3)
  c = partition.dirichlet_partition(_LABELS, 50, 0.5, seed=4)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_skew_grows_as_alpha_shrinks():
  # Hand derivation for alpha=100, 100 clients, 6000 examples per class: a
  # client's count of a class has variance 6000^2 Var[Beta(100, 9900)] +
  # 6000 * 0.01 * 0.99 = 35.6 + 59.4 = 95, i.e. a relative sd of 9.75 / 60 =
  # 0.16, so TV ~= 0.5 * 10 * 0.1 * 0.16 * E|z| (0.80) = 0.065; observed
  # 0.061-0.063 over seeds 0-4. At alpha=0.1 a client holds one or two
  # classes; observed TV 0.70-0.73 over seeds 0-4.
  tv_iidish = partition.label_skew(
      _LABELS, partition.dirichlet_partition(_LABELS, 100, 100.0, seed=0), 10)
  tv_skewed = partition.label_skew(
      _LABELS, partition.dirichlet_partition(_LABELS, 100, 0.1, seed=0), 10)
  tv_mid = partition.label_skew(
      _LABELS, partition.dirichlet_partition(_LABELS, 100, 1.0, seed=0), 10)
  assert 0.03 < tv_iidish < 0.1
  assert tv_skewed > 0.5
  assert tv_iidish < tv_mid < tv_skewed


def test_label_skew_hand_examples():
  labels = np.array([0, 0, 1, 1])
  # Each client holds one of two balanced classes: TV = 0.5 each.
  assert partition.label_skew(labels, np.array([0, 0, 1, 1]), 2) == 0.5
  # Each client mirrors the global mix: TV = 0.
  assert partition.label_skew(labels, np.array([0, 1, 0, 1]), 2) == 0.0
  # Client ids need not be contiguous; an unseen class counts as mass 0.
  labels = np.array([0, 1, 2, 2])
  ids = np.array([7, 7, 3, 3])
  # Global (.25, .25, .5, 0); client 7 (.5, .5, 0, 0) -> TV .5;
  # client 3 (0, 0, 1, 0) -> TV .5.
  assert partition.label_skew(labels, ids, 4) == pytest.approx(0.5)


def test_label_skew_matches_loop_reference():
  ids = partition.dirichlet_partition(_LABELS[::10], 37, 0.3, seed=1)
  assert partition.label_skew(_LABELS[::10], ids, 10) == pytest.approx(
      _loop_label_skew(_LABELS[::10], ids, 10))


def test_label_skew_rejects_unpartitioned():
  with pytest.raises(ValueError, match='partition the dataset first'):
    partition.label_skew(np.array([0, 1]), np.array([-1, -1]), 2)


def test_iid_partition_sizes_and_skew():
  ids = partition.iid_partition(_LABELS[:1003], 10, seed=0)
  sizes = np.bincount(ids, minlength=10)
  assert sizes.sum() == 1003 and sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(
      ids, partition.iid_partition(_LABELS[:1003], 10, seed=0))
  # Shuffled, so the contiguous class blocks are spread over clients.
  ids = partition.iid_partition(_LABELS, 100, seed=0)
  # 600 per client: binomial sd sqrt(600*.1*.9)/600 = 0.012 per class, so
  # TV ~= 0.5 * 10 * 0.012 * 0.80 = 0.049; observed 0.046.
  assert partition.label_skew(_LABELS, ids, 10) < 0.06


def test_min_examples_guaranteed_when_draws_fall_short():
  # 1000 examples, 100 clients, alpha=0.1: single draws regularly leave
  # clients with fewer than 5 examples, so the top-up path is exercised.
  labels = np.repeat(np.arange(10), 100)
  for seed in range(3):
    ids = partition.dirichlet_partition(labels, 100, 0.1, seed=seed,
                                        min_examples=5, max_resamples=0)
    sizes = np.bincount(ids, minlength=100)
    assert sizes.min() >= 5 and sizes.sum() == 1000
  # Exactly feasible: every client gets exactly min_examples.
  ids = partition.dirichlet_partition(labels, 100, 0.1, seed=0,
                                      min_examples=10)
  np.testing.assert_array_equal(np.bincount(ids), np.full(100, 10))


def test_errors():
  labels = np.arange(5) % 2
  with pytest.raises(ValueError, match='num_clients=6 exceeds the 5'):
    partition.dirichlet_partition(labels, 6, 1.0, seed=0)
  with pytest.raises(ValueError, match='num_clients=6 exceeds the 5'):
    partition.iid_partition(labels, 6, seed=0)
  for alpha in (0.0, -1.0, float('nan'), float('inf')):
    with pytest.raises(ValueError, match='alpha must be a positive'):
      partition.dirichlet_partition(labels, 2, alpha, seed=0)
  with pytest.raises(ValueError, match='lower min_examples to at most 2'):
    partition.dirichlet_partition(labels, 2, 1.0, seed=0, min_examples=3)
  with pytest.raises(ValueError, match='integers'):
    partition.dirichlet_partition(labels.astype(float), 2, 1.0, seed=0)


def test_assign_clients():
  ds = ArrayDataset(x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 0, 1]),
                    client_id=np.full(4, -1, np.int32), class_names=('a', 'b'))
  out = partition.assign_clients(ds, np.array([1, 0, 1, 0], np.int64))
  assert out.client_id.dtype == np.int32
  np.testing.assert_array_equal(out.client_id, [1, 0, 1, 0])
  np.testing.assert_array_equal(out.clients(), [0, 1])
  np.testing.assert_array_equal(ds.client_id, -1)  # The input is unchanged.
  with pytest.raises(ValueError, match='one id per example'):
    partition.assign_clients(ds, np.zeros(3, np.int32))
