"""Choosing a sparse update scheme under a memory budget.

Lin et al. (2022), "On-Device Training Under 256KB Memory", Section 3.2:
measure how much each candidate update *unit* (the biases of one layer, the
weights of one layer) improves accuracy on its own, then pick the set of
units whose summed gain is largest while the training memory of the
resulting scheme fits the device's budget.

Memory is not additive over units: the backward pass must reach the
earliest trainable layer, and every ReLU on the way keeps its mask, so
adding a bias deep in the network can cost more than a weight near the
head. The search therefore asks `memory_fn(units)` for the analytic memory
of the whole scheme (ondevice.cost.analytic_training_memory) and picks, at
each step, the affordable unit with the best gain per *marginal* byte
(greedy knapsack; Lin et al. use an evolutionary search over the same
objective). Units whose measured gain does not exceed `min_gain` (by
default in `experiment.run`, the standard error of the validation
accuracy) are never added.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from sparse_updates import presets
from sparse_updates.rules import TRAIN, Rules


@dataclasses.dataclass(frozen=True)
class Unit:
  """One candidate for updating: a layer's biases or its weights.

  Attributes:
    name: '<layer>:bias' or '<layer>:weight'.
    layer: the layer's name (see `presets.model_layers`).
    kind: 'bias' or 'weight'.
    paths: the parameter paths it trains.
    fraction: fraction of output channels that train (weights only).
  """
  name: str
  layer: str
  kind: str
  paths: tuple[str, ...]
  fraction: float = 1.0


def contribution_units(params: Any, weight_fraction: float = 1.0,
                       layer_order: Sequence[str] | None = None
                       ) -> list[Unit]:
  """Bias and weight units of every layer but the classifier, input first.

  The biases of a layer include its norm's bias (a folded model has none).
  """
  if not 0.0 < weight_fraction <= 1.0:
    raise ValueError(f'weight_fraction must lie in (0, 1]; got '
                     f'{weight_fraction}.')
  units = []
  for layer in presets.model_layers(params, layer_order):
    if layer.name.rsplit('/', 1)[-1] == 'classifier':
      continue
    biases = layer.leaves('bias')
    if biases:
      units.append(Unit(f'{layer.name}:bias', layer.name, 'bias', biases))
    kernels = layer.leaves('kernel')
    units.append(Unit(f'{layer.name}:weight', layer.name, 'weight', kernels,
                      weight_fraction))
  return units


def scheme_rules(units: Sequence[Unit], head: bool = True) -> Rules:
  """Rules training the classifier (if `head`) and the given units."""
  rules = [(presets.HEAD, TRAIN)] if head else []
  for unit in units:
    value = TRAIN if unit.fraction >= 1.0 else unit.fraction
    rules += presets.exact_rules(unit.paths, value)
  return rules + [('.*', None)]


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """The chosen units, their summed gain and the scheme's memory."""
  units: tuple[Unit, ...]
  gain: float
  memory_bytes: int
  budget_bytes: int
  feasible: bool

  def to_json(self) -> dict[str, Any]:
    return {'units': [u.name for u in self.units], 'gain': self.gain,
            'memory_bytes': self.memory_bytes,
            'budget_bytes': self.budget_bytes, 'feasible': self.feasible}


def greedy_search(units: Sequence[Unit], gains: Mapping[str, float],
                  memory_fn: Callable[[Sequence[Unit]], int],
                  budget_bytes: int, min_gain: float = 0.0) -> SearchResult:
  """Greedy gain-per-marginal-byte selection under `budget_bytes`.

  Args:
    units: candidates.
    gains: {unit name: accuracy gain over the classifier-only baseline}.
    memory_fn: training memory in bytes of the scheme made of these units
      (plus the classifier); called on growing sets, so cache it if slow.
    budget_bytes: the device's training memory budget.
    min_gain: only units whose gain exceeds this are candidates; set it to
      the validation accuracy's standard error so that noise is not
      mistaken for contribution (gains measured alone do not add up).

  Returns:
    A SearchResult; `feasible` is False when even the classifier-only
    scheme exceeds the budget (then no unit is chosen).
  """
  missing = sorted(u.name for u in units if u.name not in gains)
  if missing:
    raise ValueError(f'No measured gain for units {missing}; run the '
                     'contribution analysis over the same units.')
  chosen: list[Unit] = []
  current = int(memory_fn(chosen))
  if current > budget_bytes:
    return SearchResult((), 0.0, current, budget_bytes, False)
  while True:
    best, best_score, best_memory = None, 0.0, current
    for unit in units:
      if unit in chosen or gains[unit.name] <= max(min_gain, 0.0):
        continue
      memory = int(memory_fn(chosen + [unit]))
      if memory > budget_bytes:
        continue
      score = gains[unit.name] / max(memory - current, 1)
      if best is None or score > best_score:
        best, best_score, best_memory = unit, score, memory
    if best is None:
      break
    chosen.append(best)
    current = best_memory
  return SearchResult(tuple(chosen), float(sum(gains[u.name] for u in chosen)),
                      current, budget_bytes, True)


def cached(memory_fn: Callable[[Sequence[Unit]], int]
           ) -> Callable[[Sequence[Unit]], int]:
  """Memoises `memory_fn` on the *set* of units (order does not matter)."""
  cache: dict[frozenset[str], int] = {}

  def wrapped(units: Sequence[Unit]) -> int:
    key = frozenset(u.name for u in units)
    if key not in cache:
      cache[key] = int(memory_fn(units))
    return cache[key]

  return wrapped
