"""The models a FedUV experiment compares, and the rows they produce.

  central_softmax  softmax over users on pooled data (not private)
  fed_softmax      the same model by FedAvg: the softmax layer, i.e. every
                   user's class embedding, is shared with the server
  feduv            FedUV (Hosseini et al., ICML 2021): positive-only loss on
                   secret BCH codewords, nothing user-specific is shared
  *_dp             the federated ones with DP-FedAvg (`fedjax_ext.privacy`)

A FedUV model is scored once per reference of `config.feduv_references`:
'codeword' (the paper: an utterance's embedding against the user's secret
codeword; row `feduv`) and 'mean' (against the mean embedding of the user's
own training utterances, the softmax baselines' enrollment; row
`feduv_mean_ref`). A softmax model has no codeword, so it is scored against
the mean only, under its own name.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple


class Variant(NamedTuple):
  kind: str        # 'softmax' or 'feduv' (`verification.VARIANT_KINDS`).
  federated: bool
  dp: bool


VARIANTS = {
    'central_softmax': Variant('softmax', False, False),
    'fed_softmax': Variant('softmax', True, False),
    'feduv': Variant('feduv', True, False),
    'fed_softmax_dp': Variant('softmax', True, True),
    'feduv_dp': Variant('feduv', True, True),
}
# Reference a FedUV score compares with -> suffix of its row name.
REFERENCE_SUFFIX = {'codeword': '', 'mean': '_mean_ref'}


def parse_variants(spec: str) -> list[str]:
  """'feduv, fed_softmax' -> ['feduv', 'fed_softmax'] (not checked)."""
  return [v.strip() for v in str(spec).split(',') if v.strip()]


def references(name: str, feduv_references: Iterable[str]) -> tuple[str, ...]:
  """The references variant `name` is scored against."""
  if VARIANTS[name].kind != 'feduv':
    return ('mean',)
  if isinstance(feduv_references, str):
    return (feduv_references,)
  return tuple(feduv_references)


def row_name(name: str, reference: str) -> str:
  """The results row of variant `name` scored against `reference`."""
  if VARIANTS[name].kind == 'feduv':
    return name + REFERENCE_SUFFIX[reference]
  return name


def row_order(names: Iterable[str]) -> list[str]:
  """Row names in VARIANTS order, each variant's references after it."""
  names = set(names)
  return [n for v in VARIANTS
          for n in [v] + [v + s for s in REFERENCE_SUFFIX.values() if s]
          if n in names]
