"""Test of few_shot.meta_training: the keyword-split benchmark end to end."""
import ml_collections
import numpy as np

from few_shot import meta_training
from ondevice.data.base import ArrayDataset

WORDS = ('yes', 'no', 'up', 'cat', 'dog', 'bird')


def _words(speakers, rng, means):
  y = np.tile(np.repeat(np.arange(len(WORDS)), 3), speakers).astype(np.int32)
  client_id = np.repeat(np.arange(speakers), 3 * len(WORDS)).astype(np.int32)
  x = means[y] + 0.2 * rng.normal(size=(len(y), 5, 4))
  return ArrayDataset(x=x.astype(np.float32), y=y, client_id=client_id,
                      class_names=WORDS)


def test_keyword_benchmark_meta_trains_on_train_words_and_tests_on_others(
    tmp_path):
  rng = np.random.default_rng(0)
  means = rng.normal(size=(len(WORDS), 5, 4))
  cfg = ml_collections.ConfigDict(dict(
      names=('protonet',), train_words=WORDS[3:], test_words=WORDS[:3],
      n_way=2, k_shots=(1,), n_query=2, num_steps=3, tasks_per_step=2,
      eval_tasks=2, protonet=dict(outer_lr=1e-2), log_every=3))
  out = meta_training.keyword_benchmark(
      # Equal split shapes and task counts: one compiled sampler serves both.
      cfg, _words(2, rng, means), _words(2, rng, means), model_name='mlp',
      model_kwargs={'hidden': (8,), 'norm': 'none'}, seed=0,
      workdir=str(tmp_path))
  entry = out['protonet']['1shot']
  assert entry['num_tasks'] == 2 and 0.0 <= entry['mean'] <= 1.0
  assert entry['ci95'] >= 0.0 and entry['meta_train_steps_per_second'] > 0
  assert (tmp_path / 'protonet_1shot' / 'metrics.jsonl').exists()



def test_meta_train_resumes_bit_for_bit_from_its_checkpoint(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from few_shot import maml  # pylint: disable=g-import-not-at-top

  def loss(params, model_state, batch, rng):
    del rng
    err = jax.numpy.square(batch['x'] * params['w'] - batch['y'])
    count = jax.numpy.sum(batch['mask'])
    return jax.numpy.sum(err * batch['mask']) / count, (
        {'loss_sum': jax.numpy.sum(err), 'correct': 0.0, 'count': count},
        model_state)

  def sample(key):  # Two regression tasks whose slope depends on the key.
    slope = jax.random.normal(key, (2, 1))
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 4))
    batch = {'x': x, 'y': slope * x, 'mask': jax.numpy.ones((2, 4))}
    return {'support': batch, 'query': batch}

  learn = maml.meta_sgd(loss, optax.adam(0.1), inner_lr=0.1, inner_steps=1)
  init = learn.init({'w': jax.numpy.array(0.3)})
  run = lambda steps, d: meta_training.meta_train(
      learn, init, sample, num_steps=steps, key=jax.random.key(0),
      log_every=1, workdir=str(tmp_path / d), checkpoint_every=2)
  straight, summary = run(5, 'a')
  assert summary['resumed_from'] == 0
  run(3, 'b')  # Interrupted after 3 steps (checkpoints at 2 and 3).
  resumed, summary = run(5, 'b')
  assert summary['resumed_from'] == 3
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert summary['final_loss'] == run(5, 'b')[1]['final_loss']
  # metrics.jsonl of the resumed run equals the uninterrupted run's, row for
  # row, but for wall-clock fields.
  from ondevice import loop  # pylint: disable=g-import-not-at-top
  from ondevice import metric_writer  # pylint: disable=g-import-not-at-top
  rows = [[{k: v for k, v in r.items() if k not in loop.WALL_CLOCK_KEYS}
           for r in metric_writer.read_metrics(
               str(tmp_path / d / 'metrics.jsonl'))] for d in 'ab']
  assert len(rows[0]) == 5 and rows[0] == rows[1]
  # The init moved, so the comparison above is not trivially true.
  assert not np.allclose(np.asarray(straight.params['w']), 0.3)
  with pytest.raises(ValueError, match='past num_steps=4'):
    run(4, 'a')
