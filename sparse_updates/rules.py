"""Which parameters train: ordered regex rules over parameter paths.

Parameter groups are declared as in big_vision: an ordered list of
`(pattern, value)` pairs; a path takes the value of the *first* pattern that
matches it in full (`re.fullmatch`), and a value of None freezes it:

    rules = [('classifier/.*', 'train'),   # the new head trains
             ('.*/bias', 'train'),         # BitFit (Ben Zaken et al., 2022)
             ('.*', None)]                 # everything else is frozen

A value is one of
  * None: frozen. Its gradient is never formed (see `ondevice.train`).
  * 'train': every element of the leaf trains.
  * a float f in (0, 1]: only a fraction f of the leaf's output channels
    (its last axis) trains, the partial-channel update of the Tiny Training
    Engine (Lin et al., 2022, "On-Device Training Under 256KB Memory").
    The leaf is in the trainable partition and a per-element update mask
    (`sparse_updates.channel_masks`) keeps the other channels fixed.

A parameter that no rule matches is an error naming it: silent defaults are
how a "bias-only" run ends up training everything. Paths are those of
`ondevice.train.flatten_params`, e.g. 'pw3/kernel' or 'conv0_norm/bias'.

    paths = trainable_paths(params, rules)
    step = train.make_train_step(loss_fn, optimizer, paths)
"""
from __future__ import annotations

import functools
import numbers
import re
from typing import Any, Sequence

from ondevice import train

TRAIN = 'train'
Value = Any  # None | 'train' | float in (0, 1]
Rules = Sequence[tuple[str, Value]]


def _check_value(pattern: str, value: Value) -> None:
  if value is None or value == TRAIN:
    return
  if (isinstance(value, numbers.Real) and not isinstance(value, bool)
      and 0.0 < float(value) <= 1.0):
    return
  raise ValueError(
      f'Rule ({pattern!r}, {value!r}) has an invalid value; use None to '
      f'freeze, {TRAIN!r} to train the whole leaf, or a float in (0, 1] '
      'for the fraction of output channels that train.')


@functools.lru_cache(maxsize=512)
def _compile(pattern: str) -> re.Pattern:
  return re.compile(pattern)


def validate_rules(rules: Rules) -> list[tuple[str, Value]]:
  """Checks the shape of `rules` and compiles every pattern.

  Returns:
    The rules as a list of (pattern, value) pairs.

  Raises:
    ValueError: a rule that is not a pair, a bad regex or a bad value.
  """
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ValueError(f'Rules must be a list of (pattern, value) pairs; got '
                     f'{rules!r}. Example: [(".*/bias", "train"), '
                     '(".*", None)].')
  out = []
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f'Each rule is a (pattern, value) pair; got {rule!r}.')
    pattern, value = rule
    if not isinstance(pattern, str):
      raise ValueError(f'Rule pattern {pattern!r} is not a string.')
    try:
      _compile(pattern)
    except re.error as e:
      raise ValueError(f'Rule pattern {pattern!r} is not a valid regular '
                       f'expression: {e}.') from e
    _check_value(pattern, value)
    out.append((pattern, value))
  return out


def match(path: str, rules: Rules) -> Value:
  """The value of the first rule whose pattern matches all of `path`.

  Raises:
    ValueError: when no rule matches; the message names the path.
  """
  for pattern, value in validate_rules(rules):
    if _compile(pattern).fullmatch(path):
      return value
  raise ValueError(
      f'Parameter {path!r} matches no rule in {[p for p, _ in rules]}; add a '
      "rule for it, or end the list with a catch-all such as ('.*', None) "
      'to freeze everything not named.')


def assign(params: Any, rules: Rules) -> dict[str, Value]:
  """{path: value} for every leaf of `params`, in the tree's order."""
  rules = validate_rules(rules)
  return {path: match(path, rules) for path in train.flatten_params(params)}


def trainable_paths(params: Any, rules: Rules) -> tuple[str, ...]:
  """Sorted paths of the leaves that any rule trains (value not None).

  The result plugs into `ondevice.train.init_state(..., trainable=paths)`
  and `make_train_step(loss_fn, optimizer, paths)`.

  Raises:
    ValueError: an unmatched parameter, or rules that freeze every leaf.
  """
  values = assign(params, rules)
  paths = tuple(sorted(p for p, v in values.items() if v is not None))
  if not paths:
    raise ValueError(
        f'The rules {list(rules)} freeze all {len(values)} parameters; at '
        "least one must train (e.g. add ('.*/bias', 'train')).")
  return paths


def channel_fractions(params: Any, rules: Rules) -> dict[str, float]:
  """{path: fraction} for the leaves that train only part of their channels.

  Leaves whose value is 'train' or a fraction of 1.0 train fully and are not
  listed.
  """
  return {p: float(v) for p, v in assign(params, rules).items()
          if v is not None and v != TRAIN and float(v) < 1.0}


def describe(params: Any, rules: Rules) -> dict[str, Any]:
  """Counts of trainable and frozen scalars, for logs and reports."""
  flat = train.flatten_params(params)
  values = assign(params, rules)
  total = sum(int(v.size) for v in flat.values())
  trained = 0.0
  for path, value in values.items():
    if value is not None:
      fraction = 1.0 if value == TRAIN else float(value)
      trained += fraction * int(flat[path].size)
  return {'num_params': total, 'num_trainable': int(round(trained)),
          'trainable_fraction': trained / max(total, 1),
          'trainable_paths': [p for p, v in values.items() if v is not None]}


def merge_rules(*rule_lists: Rules) -> list[tuple[str, Value]]:
  """Concatenates rule lists; earlier lists take precedence."""
  out = []
  for rules in rule_lists:
    out.extend(validate_rules(rules))
  return out


def as_predicate(rules: Rules):
  """A `path -> bool` predicate for APIs that take one (e.g. init_state).

  Unlike `trainable_paths` it needs no params up front; it still raises for
  a path that no rule matches.
  """
  rules = validate_rules(rules)
  return lambda path: match(path, rules) is not None

