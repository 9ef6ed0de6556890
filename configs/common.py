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


def augment(time_mask: int = 0, freq_mask: int = 0,
            max_shift: int = 0) -> ml_collections.ConfigDict:
  """A `central.supervised` `augment` section (see `ondevice.augment`).

  SpecAugment views of each training batch: one time mask of up to
  `time_mask` frames, one frequency mask of up to `freq_mask` bands and a
  circular shift of up to `max_shift` frames per clip. All zeros (the
  default) trains on the clips as they are.
  """
  return ml_collections.ConfigDict(dict(
      time_mask=time_mask, freq_mask=freq_mask, max_shift=max_shift))
