"""Meta-learners chosen by name from a table, `META_LEARNERS[name](model)`.

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

Every entry of the table has the signature

    factory(model, *, num_classes, loss_fn=None, outer_trainable=None,
            **hyperparameters) -> MetaLearner

where the hyperparameters are keyword arguments with defaults. A config
declares one sub-config per learner holding them (`default_configs`, built
from those defaults), next to a tuple of the names to run:

    config.meta.names = ('maml', 'reptile')
    config.meta.update(meta_learners.default_configs(inner_lr=0.01))
    # --config.meta.reptile.step_size=0.3
    learner = meta_learners.from_config(config.meta, 'reptile', model,
                                        num_classes=36, key='config.meta')

The outer optimiser is Adam (`outer_lr`) for every learner but Reptile,
whose outer step is Nichol et al.'s interpolation phi += epsilon (W - phi),
i.e. SGD with learning rate `step_size` on the pseudo-gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import ml_collections
import optax

from few_shot import learner as learner_lib
from few_shot import maml as maml_lib
from few_shot import protonets
from few_shot import reptile as reptile_lib
from ondevice import options
from ondevice import train

# Arguments the caller supplies from the experiment, never from the config.
CONTEXT_ARGS = ('model', 'num_classes', 'loss_fn', 'outer_trainable')


def _gradient_family(factory: Callable[..., learner_lib.MetaLearner],
                     name: str) -> Callable[..., learner_lib.MetaLearner]:
  """A table entry for one of the MAML family (few_shot.maml)."""

  def build(model: nn.Module, *, num_classes: int,
            loss_fn: train.LossFn | None = None, outer_trainable=None,
            inner_lr: float = 0.01, inner_steps: int = 1,
            eval_inner_steps: int | None = None,
            outer_lr: float = 1e-3) -> learner_lib.MetaLearner:
    del num_classes  # The adapted classifier keeps the model's classes.
    return factory(loss_fn or train.classification_loss(model),
                   optax.adam(outer_lr), inner_lr=inner_lr,
                   inner_steps=inner_steps, eval_inner_steps=eval_inner_steps,
                   outer_trainable=outer_trainable)

  build.__name__ = name
  build.__doc__ = f'{factory.__doc__} The outer optimiser is Adam.'
  return build


def reptile(model: nn.Module, *, num_classes: int,
            loss_fn: train.LossFn | None = None, outer_trainable=None,
            inner_lr: float = 0.01, inner_steps: int = 1,
            eval_inner_steps: int | None = None,
            step_size: float = 0.5) -> learner_lib.MetaLearner:
  """Reptile with SGD inside and Nichol et al.'s epsilon (`step_size`)."""
  del num_classes
  return reptile_lib.reptile(
      loss_fn or train.classification_loss(model), optax.sgd(step_size),
      inner_optimizer=optax.sgd(inner_lr), inner_steps=inner_steps,
      trainable=outer_trainable, eval_inner_steps=eval_inner_steps)


def protonet(model: nn.Module, *, num_classes: int,
             loss_fn: train.LossFn | None = None, outer_trainable=None,
             outer_lr: float = 1e-3) -> learner_lib.MetaLearner:
  """ProtoNets over the model's features, meta-trained with Adam."""
  return protonets.protonet(model, optax.adam(outer_lr),
                            num_classes=num_classes, trainable=outer_trainable,
                            loss_fn=loss_fn)


META_LEARNERS: dict[str, Callable[..., learner_lib.MetaLearner]] = {
    'maml': _gradient_family(maml_lib.maml, 'maml'),
    'fomaml': _gradient_family(maml_lib.fomaml, 'fomaml'),
    'reptile': reptile,
    'anil': _gradient_family(maml_lib.anil, 'anil'),
    'meta_sgd': _gradient_family(maml_lib.meta_sgd, 'meta_sgd'),
    'protonet': protonet,
}

# Hyperparameters by kind, for validation.
_RATES = ('inner_lr', 'outer_lr', 'step_size')
_STEPS = ('inner_steps', 'eval_inner_steps')


def default_configs(**shared: Any) -> dict[str, ml_collections.ConfigDict]:
  """One sub-config per learner from its keyword defaults.

  Args:
    **shared: values for every learner that takes that argument, e.g.
      inner_lr=0.01 sets it for the MAML family and Reptile, not ProtoNets.
  """
  out = {}
  for name, factory in META_LEARNERS.items():
    values = options.keyword_defaults(factory, skip=CONTEXT_ARGS)
    values.update({k: v for k, v in shared.items() if k in values})
    out[name] = ml_collections.ConfigDict(values)
  return out


def hyperparameters(cfg: ml_collections.ConfigDict, name: str,
                    key: str) -> dict[str, Any]:
  """The keyword arguments `cfg.<name>` holds for the learner `name`.

  Raises:
    ValueError: naming `key` when `name` is unknown, its sub-config is
      missing, or it holds an argument the learner does not take.
  """
  if name not in META_LEARNERS:
    raise ValueError(f'{key}.names has {name!r}, which is unknown; choose '
                     f'from {sorted(META_LEARNERS)}.')
  if name not in cfg:
    raise ValueError(f'{key}.{name} is missing: every name in {key}.names '
                     'needs its sub-config (meta_learners.default_configs).')
  kwargs = {k: v for k, v in cfg[name].items() if v is not None}
  options.check_kwargs(META_LEARNERS[name], kwargs, f'{key}.{name}')
  bad = sorted(set(kwargs) & set(CONTEXT_ARGS))
  if bad:
    raise ValueError(f'{key}.{name} sets {bad}, which the experiment '
                     'supplies; remove them.')
  return kwargs


def validate(config: ml_collections.ConfigDict, key: str) -> None:
  """Checks `config.<key>.names` and every learner sub-config under `key`.

  Args:
    config: the whole config.
    key: dotted key of the block, e.g. 'meta' or 'keyword_split'.
  """
  cfg = options.get(config, key)
  names = options.get(config, f'{key}.names')
  if isinstance(names, str) or not isinstance(names, (tuple, list)):
    raise ValueError(f'config.{key}.names must be a tuple of names from '
                     f'{sorted(META_LEARNERS)}; got {names!r}.')
  if len(set(names)) != len(names):
    raise ValueError(f'config.{key}.names={tuple(names)} repeats a name.')
  for name in names:
    hyperparameters(cfg, name, f'config.{key}')
  for name in META_LEARNERS:
    if name not in cfg:
      continue
    # Sub-configs of learners not run are checked too: a typo there is as
    # likely a mistake as one in a learner that runs.
    hyperparameters(cfg, name, f'config.{key}')
    for arg, value in cfg[name].items():
      if arg in _RATES:
        options.positive(config, f'{key}.{name}.{arg}')
      elif arg in _STEPS and (value is not None or arg == 'inner_steps'):
        _check_steps(config, f'{key}.{name}.{arg}')


def _check_steps(config, key: str) -> None:
  value = options.get(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'config.{key} must be an int >= 1; got {value!r}.')


def build(name: str, model: nn.Module, *, num_classes: int,
          loss_fn: train.LossFn | None = None, outer_trainable=None,
          **kwargs) -> learner_lib.MetaLearner:
  """The learner `name` over `model` with hyperparameters `kwargs`."""
  if name not in META_LEARNERS:
    raise ValueError(f'Unknown meta-learner {name!r}; choose from '
                     f'{sorted(META_LEARNERS)}.')
  return META_LEARNERS[name](model, num_classes=num_classes, loss_fn=loss_fn,
                             outer_trainable=outer_trainable, **kwargs)


def from_config(cfg: ml_collections.ConfigDict, name: str, model: nn.Module,
                *, num_classes: int, key: str,
                loss_fn: train.LossFn | None = None,
                outer_trainable=None) -> learner_lib.MetaLearner:
  """The learner `name` with the hyperparameters of `cfg.<name>`."""
  return build(name, model, num_classes=num_classes, loss_fn=loss_fn,
               outer_trainable=outer_trainable,
               **hyperparameters(cfg, name, key))

