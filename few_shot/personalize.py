"""Per-user personalisation: adapt an initialisation on K enrollment
utterances per keyword, then score that user's held-out utterances.

The initialisation is a global model (trained on many speakers) or a
meta-learned one (MAML, Reptile, ... in `few_shot.meta_learners`); the
adaptation rule is any `adapt_fn(state, support, key) -> (params,
model_state)`:

* `finetune_adapter`: plain fine-tuning with any optax optimiser, any
  trainable subset (e.g. `sparse_updates.get_rules('bias_only', params)`)
  and a model built with any kwargs (e.g. int8 `quantized_training`).
* `learner_adapter`: the meta-learner's own rule (MAML's inner loop, Meta-SGD's
  learned rates, ANIL's head-only loop, ProtoNet prototypes).
* `no_adaptation`: the initialisation as it is (the baseline).

Evaluation is vmapped over users: each user's adapted model scores all of
that user's evaluation utterances, and `detection.detection_at_far` turns
the scores into the keyword detection rate at a fixed false-accept rate.
The adaptation idea follows Finn et al. 2017 and, for federated users,
Fallah et al. 2020 ("Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", Per-FedAvg).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from few_shot import adaptation
from few_shot import detection
from few_shot import learner as learner_lib
from ondevice import train

PyTree = Any
AdaptFn = Callable[[learner_lib.MetaState, Mapping[str, jax.Array],
                    jax.Array], tuple[PyTree, PyTree]]


def as_state(params: PyTree, model_state: PyTree = None
             ) -> learner_lib.MetaState:
  """Wraps plain (e.g. globally trained) params as an initialisation."""
  return learner_lib.MetaState(params=params, model_state=dict(
      model_state or {}), opt_state=(), inner_lr={},
                               step=jnp.zeros((), jnp.int32))


def no_adaptation() -> AdaptFn:
  def adapt(state, support, key):
    del support, key
    return state.params, state.model_state
  return adapt


def finetune_adapter(loss_fn: train.LossFn,
                     optimizer: optax.GradientTransformation, num_steps: int,
                     trainable: Sequence[str] | Callable[[str], bool] | None
                     = None) -> AdaptFn:
  """Fine-tunes `trainable` leaves for `num_steps` full-batch steps.

  Args:
    loss_fn: e.g. `train.classification_loss(model)` of a quantised model.
    optimizer: fresh for every user.
    num_steps: steps on the user's support set.
    trainable: paths or a predicate (e.g. from `sparse_updates`); None: all.
  """
  adaptation.check_num_steps('num_steps', num_steps)

  def adapt(state, support, key):
    paths = train.resolve_trainable(state.params, trainable)
    finetune = adaptation.make_finetune(loss_fn, optimizer, paths, num_steps)
    params, model_state, _ = finetune(state.params, state.model_state,
                                      support, key)
    return params, model_state
  return adapt


def learner_adapter(learner: learner_lib.MetaLearner) -> AdaptFn:
  """The meta-learner's own adaptation rule (its `adapt`)."""
  def adapt(state, support, key):
    return learner.adapt(state, support, key), state.model_state
  return adapt


def make_scores(model: nn.Module):
  """`(params, model_state, x) -> softmax probabilities`, in eval mode."""
  def scores(params, model_state, x):
    logits = model.apply({'params': params, **model_state}, x, train=False)
    return jax.nn.softmax(logits, axis=-1)
  return scores


def make_user_evaluator(model: nn.Module, adapt_fn: AdaptFn, far: float):
  """Builds jitted `evaluate(state, tasks, key) -> per-user metrics`.

  Args:
    model: flax model (the same module the params belong to).
    adapt_fn: the adaptation rule.
    far: false-accept rate of the detection operating point.

  Returns:
    evaluate(state, tasks, key), tasks with a leading user axis (from
    `episodes.all_enrollment_tasks`); returns {'detection_rate',
    'false_accept_rate', 'threshold', 'keyword_accuracy', ...} of shape
    [num_users].
  """
  scores = make_scores(model)

  def evaluate_user(state, task, key):
    params, model_state = adapt_fn(state, task['support'], key)
    query = task['query']
    probs = scores(params, model_state, query['x'])
    out = detection.detection_at_far(probs, query['y'], query['mask'],
                                     task['classes'], far)
    is_keyword = jnp.any(query['y'][:, None] == task['classes'][None, :],
                         axis=1) & (query['mask'] > 0)
    correct = jnp.argmax(probs, -1) == query['y']
    out['keyword_accuracy'] = (jnp.sum(correct & is_keyword) /
                               jnp.maximum(jnp.sum(is_keyword), 1))
    return out

  def evaluate(state, tasks, key):
    num_users = tasks['query']['y'].shape[0]
    return jax.vmap(evaluate_user, in_axes=(None, 0, 0))(
        state, tasks, jax.random.split(key, num_users))

  return jax.jit(evaluate)


def evaluate_in_chunks(evaluate, state, tasks, key, chunk: int
                       ) -> dict[str, np.ndarray]:
  """Runs `evaluate` over users `chunk` at a time (bounds peak memory).

  The last chunk is padded by repeating user 0 so that one shape compiles;
  its padded results are dropped.
  """
  num_users = tasks['query']['y'].shape[0]
  outs = []
  for start in range(0, num_users, chunk):
    index = np.arange(start, start + chunk)
    index = np.where(index < num_users, index, 0)
    part = jax.tree.map(lambda a, i=index: a[i], tasks)
    result = evaluate(state, part, jax.random.fold_in(key, start))
    keep = min(chunk, num_users - start)
    outs.append({k: np.asarray(v)[:keep] for k, v in result.items()})
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def groups_summary(per_user: Mapping[str, np.ndarray],
                   masks: Mapping[str, np.ndarray]
                   ) -> dict[str, dict[str, float]]:
  """Means and standard errors over the users of each group (bool masks over
  users), and over all users ('all')."""
  out = {}
  masks = dict(masks)
  masks['all'] = np.ones(len(per_user['detection_rate']), bool)
  for group, members in masks.items():
    members = np.asarray(members, bool)
    if not members.any():
      continue
    stats = {'num_users': int(members.sum())}
    for name in ('detection_rate', 'false_accept_rate', 'keyword_accuracy'):
      values = np.asarray(per_user[name])[members]
      stats[name] = float(values.mean())
      stats[name + '_sem'] = standard_error(values)
    out[group] = stats
  return out


def group_summary(per_user: Mapping[str, np.ndarray], is_outlier: np.ndarray
                  ) -> dict[str, dict[str, float]]:
  """`groups_summary` with the groups typical and outlier."""
  is_outlier = np.asarray(is_outlier, bool)
  return groups_summary(per_user, {'typical': ~is_outlier,
                                   'outlier': is_outlier})


def standard_error(values) -> float:
  """Standard error of the mean (0 for fewer than two values)."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return 0.0
  return float(values.std(ddof=1) / np.sqrt(len(values)))


def relative_gain(adapted: float, baseline: float) -> float:
  """(adapted - baseline) / baseline; inf when the baseline is 0."""
  if baseline == 0.0:
    return float('inf') if adapted > 0 else 0.0
  return (adapted - baseline) / baseline
