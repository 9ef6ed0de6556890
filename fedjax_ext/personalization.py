"""Personalised evaluation of a federated model on held-out users.

At an evaluation round every held-out user adapts the server model on K of
its own examples per keyword and is scored on all its other examples, the
few-shot protocol of `few_shot.enrollment` and `few_shot.personalize` run
inside the federated loop (as Per-FedAvg is judged, Fallah et al. 2020).
Adaptation uses the run's model (so its quant mode) and trainable scheme, so
the number measures what a device would get after enrolling.

The supports are drawn once, from a fixed key, so every round's numbers are
paired on the same enrollment and evaluation examples. Reported per round:
`personalized_accuracy` / `global_accuracy` (the keywords' accuracy on the
users' evaluation examples, after and before adaptation) and, when the
keywords are a strict subset of the classes, `personalized_detection_rate`
/ `global_detection_rate` at `far`.

    config.personalize = personalization.default_options()
    config.personalize.enabled = True
    evaluate = personalization.PersonalizedEval(model, loss_fn, test_ds,
                                                config.personalize, trainable)
    metrics = evaluate(params, model_state)
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import optax

from few_shot import enrollment
from few_shot import personalize
from ondevice import options
from ondevice.data.base import ArrayDataset

PyTree = Any


def default_options() -> ml_collections.ConfigDict:
  """`config.personalize`: off by default."""
  return ml_collections.ConfigDict(dict(
      enabled=False,
      k_shot=5,            # enrollment examples per keyword
      num_steps=20,        # full-batch fine-tuning steps on them
      learning_rate=0.05,  # SGD
      far=0.05,            # false-accept rate of the detection point
      keywords=(),         # class names; () means every class
      max_users=32,        # held-out users evaluated (the first eligible)
      chunk=8,             # users adapted at once (bounds memory)
      seed=0))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.personalize` (when present and enabled)."""
  cfg = config.get('personalize', None)
  if cfg is None or not cfg.enabled:
    return
  options.positive(config, 'personalize.k_shot', 'personalize.num_steps',
                   'personalize.learning_rate', 'personalize.max_users',
                   'personalize.chunk')
  options.in_range(config, 'personalize.far', 0, 1, low_inclusive=False,
                   high_inclusive=False)
  for key in ('k_shot', 'num_steps', 'max_users', 'chunk'):
    if not isinstance(cfg[key], int):
      raise ValueError(f'config.personalize.{key} must be an int; got '
                       f'{cfg[key]!r}.')


def keyword_labels(ds: ArrayDataset, names: Sequence[str]) -> list[int]:
  """Labels of the named classes; every class when `names` is empty."""
  if not names:
    return list(range(ds.num_classes))
  unknown = sorted(set(names) - set(ds.class_names))
  if unknown:
    raise ValueError(f'config.personalize.keywords has unknown classes '
                     f'{unknown}; the data has {list(ds.class_names)}.')
  return [ds.class_names.index(n) for n in names]


def eligible_users(ds: ArrayDataset, keywords: Sequence[int], k_shot: int,
                   max_users: int) -> np.ndarray:
  """The first `max_users` clients with more than k_shot examples of each
  keyword (k_shot to enroll, at least one left to evaluate)."""
  users = []
  for client in np.unique(ds.client_id[ds.client_id >= 0]):
    own = ds.y[ds.client_id == client]
    if all(np.sum(own == k) > k_shot for k in keywords):
      users.append(int(client))
    if len(users) == max_users:
      break
  if not users:
    raise ValueError(
        f'No held-out user has more than config.personalize.k_shot={k_shot} '
        'examples of every keyword; lower k_shot, name fewer keywords, or '
        'give the users more examples (e.g. config.data.utterances_per_word).')
  return np.asarray(users)


class PersonalizedEval:
  """`evaluate(params, model_state) -> metrics` over held-out users."""

  def __init__(self, model, loss_fn, test_ds: ArrayDataset,
               cfg: ml_collections.ConfigDict, trainable=None):
    keywords = keyword_labels(test_ds, tuple(cfg.keywords))
    users = eligible_users(test_ds, keywords, cfg.k_shot, cfg.max_users)
    table = enrollment.enrollment_table(test_ds.x, test_ds.y,
                                        test_ds.client_id, keywords,
                                        cfg.k_shot, users)
    key = jax.random.key(cfg.seed)
    self._tasks = enrollment.all_enrollment_tasks(table, key,
                                                  k_shot=cfg.k_shot)
    self._key = jax.random.fold_in(key, 1)
    self._chunk = min(cfg.chunk, len(users))
    self._detection = len(keywords) < test_ds.num_classes
    adapter = personalize.finetune_adapter(
        loss_fn, optax.sgd(cfg.learning_rate), cfg.num_steps, trainable)
    self._evaluators = {
        'personalized': personalize.make_user_evaluator(model, adapter,
                                                        cfg.far),
        'global': personalize.make_user_evaluator(
            model, personalize.no_adaptation(), cfg.far)}
    self.num_users = len(users)

  def __call__(self, params: PyTree, model_state: PyTree) -> dict[str, float]:
    state = personalize.as_state(params, model_state)
    out = {}
    for name, evaluate in self._evaluators.items():
      per_user = personalize.evaluate_in_chunks(evaluate, state, self._tasks,
                                                self._key, self._chunk)
      out[f'{name}_accuracy'] = float(np.mean(per_user['keyword_accuracy']))
      if self._detection:
        out[f'{name}_detection_rate'] = float(
            np.mean(per_user['detection_rate']))
    return out
