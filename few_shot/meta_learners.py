"""Meta-learners chosen by name: `build_meta_learner(name, model, ...)`.

| name     | inner loop                       | meta-gradient                |
| -------- | -------------------------------- | ---------------------------- |
| maml     | SGD on every leaf                | second order through loop    |
| fomaml   | SGD on every leaf                | query gradient at adapted    |
| reptile  | SGD on support + query           | phi - W (pseudo-gradient)    |
| anil     | SGD on the classifier only       | second order through loop    |
| meta_sgd | SGD with learned per-leaf rates  | second order, rates too      |
| protonet | none: class means of embeddings  | query loss of the prototypes |

Papers: MAML and FO-MAML, Finn et al. 2017; Reptile, Nichol et al. 2018;
ANIL, Raghu et al. 2020; Meta-SGD, Li et al. 2017; ProtoNets, Snell et al.
2017. Every learner is a `learner.MetaLearner` (init, apply, evaluate,
task_gradient, update, adapt); see the modules for details.

The outer optimiser is Adam (`outer_lr`) for every learner but Reptile,
whose outer step is Nichol et al.'s interpolation phi += epsilon (W - phi),
i.e. SGD with learning rate `reptile_step_size` on the pseudo-gradient.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import optax

from few_shot import learner as learner_lib
from few_shot import maml as maml_lib
from few_shot import protonets
from few_shot import reptile as reptile_lib
from ondevice import train

META_LEARNERS = ('maml', 'fomaml', 'reptile', 'anil', 'meta_sgd', 'protonet')


def build_meta_learner(name: str, model: nn.Module, *, num_classes: int,
                       inner_lr: float, inner_steps: int, outer_lr: float,
                       eval_inner_steps: int | None = None,
                       reptile_step_size: float = 0.5,
                       outer_trainable: Sequence[str] | Callable[[str], bool]
                       | None = None,
                       loss_fn: train.LossFn | None = None
                       ) -> learner_lib.MetaLearner:
  """Builds the meta-learner `name` over `model`.

  Args:
    name: one of META_LEARNERS.
    model: a stateless flax model (norm 'group', 'layer' or 'none') whose
      classifier has `num_classes` outputs.
    num_classes: the tasks' label space (ProtoNet prototypes).
    inner_lr: inner SGD learning rate (Meta-SGD: initial rates).
    inner_steps: inner steps during meta-training.
    outer_lr: Adam learning rate of the outer loop.
    eval_inner_steps: inner steps at evaluation / personalisation.
    reptile_step_size: Reptile's epsilon.
    outer_trainable: leaves meta-trained (None: all).
    loss_fn: task loss (default `classification_loss(model)`).

  Raises:
    ValueError: an unknown name or a non-positive rate.
  """
  if name not in META_LEARNERS:
    raise ValueError(f'Unknown meta-learner {name!r}; set config.meta.names '
                     f'to entries of {META_LEARNERS}.')
  for key, value in (('inner_lr', inner_lr), ('outer_lr', outer_lr),
                     ('reptile_step_size', reptile_step_size)):
    if not value > 0:
      raise ValueError(f'config.meta.{key} must be > 0; got {value}.')
  loss_fn = loss_fn or train.classification_loss(model)
  adam = optax.adam(outer_lr)
  common = dict(inner_lr=inner_lr, inner_steps=inner_steps,
                eval_inner_steps=eval_inner_steps,
                outer_trainable=outer_trainable)
  if name == 'maml':
    return maml_lib.maml(loss_fn, adam, **common)
  if name == 'fomaml':
    return maml_lib.fomaml(loss_fn, adam, **common)
  if name == 'anil':
    return maml_lib.anil(loss_fn, adam, **common)
  if name == 'meta_sgd':
    return maml_lib.meta_sgd(loss_fn, adam, **common)
  if name == 'reptile':
    return reptile_lib.reptile(
        loss_fn, optax.sgd(reptile_step_size),
        inner_optimizer=optax.sgd(inner_lr), inner_steps=inner_steps,
        trainable=outer_trainable, eval_inner_steps=eval_inner_steps)
  return protonets.protonet(model, adam, num_classes=num_classes,
                            trainable=outer_trainable, loss_fn=loss_fn)
