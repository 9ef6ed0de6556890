"""Shared helpers for configs: parsing the `:arg` suffix of --config."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'smoke' or 'smoke=True,model=ds_cnn_l' into a ConfigDict.

  A bare word is a boolean flag set to True. Keys not in `defaults` raise, so
  a typo in a variant name fails loudly (big_vision style).
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(','):
    key, _, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; valid arguments are '
                       f'{sorted(defaults)}.')
    if not value:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = type(defaults[key])(value)
  return out
