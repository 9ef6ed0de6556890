"""Config fields that pick a part by name, and checks of config values.

A part chosen by name (an algorithm, an aggregator, a compression, a
trainable preset, a meta-learner) is declared in the config as a `name` plus
one sub-config per choice that holds that choice's keyword arguments, so every
option of every choice can be set from the command line of a locked config:

    config.aggregator = options.named(aggregators.AGGREGATORS, 'mean')
    # --config.aggregator.name=trimmed_mean \
    # --config.aggregator.trimmed_mean.trim_fraction=0.2
    factory, kwargs = options.selected(config.aggregator,
                                       aggregators.AGGREGATORS,
                                       'config.aggregator')
    aggregator = factory(**kwargs)

The sub-configs start from the factories' own keyword defaults
(`keyword_defaults`), so a config never goes stale when a factory gains an
argument. Checks (`positive`, `in_range`, `one_of`, ...) name the dotted key
and the bad value, and are meant to run before any data loads.
"""
from __future__ import annotations

import difflib
import inspect
import math
import re
from typing import Any, Callable, Iterable, Mapping

from absl import flags
import ml_collections

_TYPES = {'int': int, 'float': float, 'str': str, 'bool': bool}


def _placeholder_type(annotation: Any) -> type | None:
  """The scalar type of an `X | None` annotation (string or type), if any."""
  if isinstance(annotation, type) and annotation in _TYPES.values():
    return annotation
  if isinstance(annotation, str):
    names = [n for n in re.findall(r'[A-Za-z_]+', annotation)
             if n not in ('None', 'Optional')]
    if len(names) == 1 and names[0] in _TYPES:
      return _TYPES[names[0]]
  return None


def keyword_defaults(fn: Callable[..., Any], skip: Iterable[str] = ()
                     ) -> dict[str, Any]:
  """The keyword arguments of `fn` that have defaults, as config values.

  A `None` default becomes a typed placeholder (from the annotation), so it
  can still be set from the command line; arguments without a default, and
  `*args` / `**kwargs`, are left out (give them in `named(overrides=...)`).
  """
  out = {}
  for name, p in inspect.signature(fn).parameters.items():
    if (name in skip or p.default is inspect.Parameter.empty or
        p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)):
      continue
    value = p.default
    if value is None:
      kind = _placeholder_type(p.annotation)
      if kind is None:
        continue  # Not settable from a flag; the factory's default applies.
      value = ml_collections.config_dict.placeholder(kind)
    elif isinstance(value, list):
      value = tuple(value)
    out[name] = value
  return out


def named(table: Mapping[str, Callable[..., Any]], selected: str, *,
          overrides: Mapping[str, Mapping[str, Any]] | None = None,
          skip: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`{name: selected, <choice>: {its keyword defaults}, ...}` for a table.

  Args:
    table: choice name -> factory.
    selected: the default choice.
    overrides: per choice, values that replace (or add to) the factory's
      keyword defaults, e.g. required arguments.
    skip: argument names that the caller supplies itself (e.g. `loss_fn`).
  """
  if selected not in table:
    raise ValueError(f'Default {selected!r} is not one of {sorted(table)}.')
  overrides = overrides or {}
  unknown = sorted(set(overrides) - set(table))
  if unknown:
    raise ValueError(f'overrides for unknown choices {unknown}; valid: '
                     f'{sorted(table)}.')
  out = ml_collections.ConfigDict({'name': selected})
  for choice, factory in table.items():
    values = keyword_defaults(factory, skip)
    values.update(overrides.get(choice, {}))
    out[choice] = ml_collections.ConfigDict(values)
  return out


def selected(cfg: ml_collections.ConfigDict,
             table: Mapping[str, Callable[..., Any]], key: str
             ) -> tuple[Callable[..., Any], dict[str, Any]]:
  """The factory named by `cfg.name` and the keyword arguments to call it with.

  Raises:
    ValueError: naming `key` when the name is unknown or its sub-config holds
      an argument the factory does not take.
  """
  name = cfg.get('name', None)
  if name not in table:
    raise ValueError(f'{key}.name={name!r} is unknown; choose one of '
                     f'{sorted(table)}.')
  kwargs = dict(cfg[name]) if name in cfg else {}
  kwargs = {k: (tuple(v) if isinstance(v, list) else v)
            for k, v in kwargs.items() if v is not None}
  check_kwargs(table[name], kwargs, f'{key}.{name}')
  return table[name], kwargs


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any],
                 key: str) -> None:
  """Raises a ValueError naming `key` if `fn` does not accept `kwargs`."""
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    valid = sorted(n for n, p in params.items()
                   if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    raise ValueError(f'{key} has unknown arguments {unknown}; '
                     f'{getattr(fn, "__name__", fn)} takes {valid}.')


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """`config` at a dotted key such as 'local.batch_size'."""
  node = config
  for part in key.split('.'):
    if part not in node:
      raise ValueError(f'The config lacks config.{key}.')
    node = node[part]
  return node


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets `config` at a dotted key such as 'local.batch_size' (an override
  in code, as `--config.local.batch_size=...` is on the command line)."""
  *parents, leaf = key.split('.')
  node = get(config, '.'.join(parents)) if parents else config
  node[leaf] = value


def require(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  """Raises a ValueError listing every dotted key the config lacks."""
  missing = []
  for key in keys:
    try:
      get(config, key)
    except ValueError:
      missing.append(f'config.{key}')
  if missing:
    raise ValueError(f'The config lacks {missing}.')


def _number(config, key: str) -> float:
  value = get(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'config.{key} must be a number; got {value!r}.')
  if not math.isfinite(value):
    raise ValueError(f'config.{key} must be finite; got {value}.')
  return value


def positive(config, *keys: str) -> None:
  """Each dotted key holds a finite number > 0."""
  for key in keys:
    value = _number(config, key)
    if value <= 0:
      raise ValueError(f'config.{key} must be > 0; got {value}.')


def non_negative(config, *keys: str) -> None:
  """Each dotted key holds a finite number >= 0."""
  for key in keys:
    value = _number(config, key)
    if value < 0:
      raise ValueError(f'config.{key} must be >= 0; got {value}.')


def booleans(config, *keys: str) -> None:
  """Each dotted key holds True or False (not 0, 1 or a string)."""
  for key in keys:
    value = get(config, key)
    if not isinstance(value, bool):
      raise ValueError(f'config.{key} must be True or False; got {value!r}.')


def in_range(config, key: str, low: float, high: float, *,
             low_inclusive: bool = True, high_inclusive: bool = True) -> None:
  """The dotted key holds a number in the stated interval."""
  value = _number(config, key)
  above = value >= low if low_inclusive else value > low
  below = value <= high if high_inclusive else value < high
  if not (above and below):
    interval = (('[' if low_inclusive else '(') + f'{low}, {high}' +
                (']' if high_inclusive else ')'))
    raise ValueError(f'config.{key} must be in {interval}; got {value}.')


def one_of(config, key: str, choices: Iterable[Any]) -> None:
  """The dotted key holds one of `choices`."""
  choices = list(choices)
  value = get(config, key)
  if value not in choices:
    raise ValueError(f'config.{key}={value!r} is unknown; choose one of '
                     f'{choices}.')


def unknown_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """Why the dotted `key` names no field of `config`, or None if it does.

  The reason names the first missing part, the fields its parent does have
  and the closest of them, e.g. "config.local has no field 'bach_size'
  (did you mean 'batch_size'?); its fields: [...]".
  """
  node, path = config, 'config'
  for part in key.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return (f'{path} is a value ({type(node).__name__}), not a config '
              'with fields')
    if part not in node:
      fields = sorted(node.keys())
      close = difflib.get_close_matches(part, fields, n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      return f'{path} has no field {part!r}{hint}; its fields: {fields}'
    node, path = node[part], f'{path}.{part}'
  return None


def name_unknown_overrides(flag: Any, argv: Iterable[str]) -> None:
  """Makes a `--config.<key>` naming no field a flag error that says why.

  ml_collections lets the KeyError of such an override escape flag parsing
  as a traceback ending in AttributeError: "'bach_size'". With this, absl
  reports it as a flag error instead (exit status 1), e.g.

      FATAL Flags parsing error: --config.local.bach_size: config.local
      has no field 'bach_size' (did you mean 'batch_size'?); its fields:
      [...]

  Args:
    flag: the `flags.Flag` that `config_flags.DEFINE_config_file` defined.
    argv: the command line, read when the flag parses (e.g. `sys.argv`).
  """
  inner = flag._parse  # pylint: disable=protected-access
  pattern = re.compile(rf'^--?(?:no)?{re.escape(flag.name)}\.([^=]+)')

  def parse(argument):
    try:
      return inner(argument)
    except (KeyError, AttributeError) as error:
      config = flag.parser.parse(argument)
      for arg in list(argv):
        match = pattern.match(arg)
        reason = match and unknown_key(config, match.group(1))
        if reason:
          raise flags.IllegalFlagValueError(
              f'--{flag.name}.{match.group(1)}: {reason}') from error
      raise

  flag._parse = parse  # pylint: disable=protected-access
