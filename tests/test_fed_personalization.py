"""Personalised evaluation of a federated model on held-out users."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from fedjax_ext import personalization
from ondevice import models
from ondevice import train
from ondevice.data.base import ArrayDataset


def _users(num_users=4, per_class=4, num_classes=3, seed=0):
  """Each user's class c sits at its own centre: a global model cannot know
  it, a few of the user's own examples can."""
  rng = np.random.default_rng(seed)
  xs, ys, ids = [], [], []
  for u in range(num_users):
    centres = rng.normal(scale=3.0, size=(num_classes, 4))
    for c in range(num_classes):
      xs.append(centres[c] + 0.1 * rng.normal(size=(per_class, 4)))
      ys += [c] * per_class
      ids += [u] * per_class
  return ArrayDataset(x=np.concatenate(xs).astype(np.float32),
                      y=np.asarray(ys, np.int32),
                      client_id=np.asarray(ids, np.int32),
                      class_names=('a', 'b', 'c'))


def _cfg(**overrides):
  cfg = personalization.default_options()
  cfg.update({**dict(enabled=True, k_shot=2, num_steps=30, learning_rate=0.5,
                     chunk=2), **overrides})
  return cfg


def _model(ds):
  model = models.build_model('mlp', ds.num_classes, hidden=(16,))
  params = model.init(jax.random.key(0), ds.x[:1])['params']
  return model, params


def test_adapting_on_own_examples_beats_the_global_model():
  ds = _users()
  model, params = _model(ds)
  evaluate = personalization.PersonalizedEval(
      model, train.classification_loss(model), ds, _cfg())
  out = evaluate(params, {})
  assert evaluate.num_users == 4
  # Every class is a keyword: accuracy only, no detection point.
  assert set(out) == {'personalized_accuracy', 'global_accuracy'}
  assert out['personalized_accuracy'] >= out['global_accuracy'] + 0.3


def test_a_vanishing_step_changes_nothing_and_detection_needs_negatives():
  ds = _users()
  model, params = _model(ds)
  evaluate = personalization.PersonalizedEval(
      model, train.classification_loss(model), ds,
      _cfg(learning_rate=1e-12, keywords=('a', 'b')))
  out = evaluate(params, {})
  assert out['personalized_accuracy'] == pytest.approx(
      out['global_accuracy'], abs=1e-6)
  assert out['personalized_detection_rate'] == pytest.approx(
      out['global_detection_rate'], abs=1e-6)


def test_users_without_enough_examples_are_left_out_or_refused():
  ds = _users(per_class=3)
  assert list(personalization.eligible_users(ds, [0, 1, 2], 2, 10)) == [
      0, 1, 2, 3]
  with pytest.raises(ValueError, match='config.personalize.k_shot=3'):
    personalization.eligible_users(ds, [0, 1, 2], 3, 10)
  with pytest.raises(ValueError, match=r"unknown classes \['z'\]"):
    personalization.keyword_labels(ds, ('a', 'z'))


@pytest.mark.parametrize('key,value', [('k_shot', 0), ('num_steps', -1),
                                       ('learning_rate', 0.0), ('far', 1.0),
                                       ('max_users', 0), ('chunk', 0)])
def test_bad_options_name_the_key(key, value):
  config = ml_collections.ConfigDict({'personalize': _cfg()})
  config.personalize[key] = value
  with pytest.raises(ValueError, match=f'config.personalize.{key}'):
    personalization.validate(config)
