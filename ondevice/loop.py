"""The loop every training run shares: resume, step, log, evaluate, checkpoint.

A centralised run steps over batches, a federated run over rounds; both are

    result = loop.run_loop(
        state, step_fn, loop.Schedule(num_steps=150, log_every=1,
                                      eval_every=10, checkpoint_every=50),
        workdir=workdir, config=config, eval_fn=evaluate, unit='round',
        counters=('num_nonfinite_clients', 'num_dropped'))

`step_fn(state, i) -> (state, metrics)` does step (or round) `i`, counted from
0; everything stochastic in it must be a function of `i` (e.g. keys folded in
with `i`), which is what makes a resumed run repeat an uninterrupted one. The
loop keeps the rest: metrics of the steps since the last log are summed on
the device and summarised at each log (`summarize`), non-finite summaries
stop the run with an error naming the step, `counters` are totals over the
whole run that are checkpointed with the state (so they survive a resume),
evaluation runs every `eval_every` steps and at the end, and progress lines
carry a rate and an ETA.

`metrics.jsonl` of a resumed run equals an uninterrupted run's except for the
wall-clock fields in `WALL_CLOCK_KEYS`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ondevice import checkpoint as checkpoint_lib
from ondevice import metric_writer

PyTree = Any
Metrics = Mapping[str, Any]
StepFn = Callable[[PyTree, int], tuple[PyTree, Metrics]]

# Fields whose values depend on the machine and the moment, not the run.
WALL_CLOCK_KEYS = ('elapsed_seconds', 'steps_per_second', 'train_seconds')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How many steps, and every how many steps to log, evaluate and save."""
  num_steps: int
  log_every: int = 1
  eval_every: int = 0       # 0: evaluate at the end only.
  checkpoint_every: int = 0  # 0: checkpoint at the end only.
  stop_after: int | None = None  # Checkpoint and return here (preemption).

  def __post_init__(self):
    for name in ('num_steps', 'log_every'):
      if getattr(self, name) <= 0:
        raise ValueError(f'Schedule.{name} must be > 0; got '
                         f'{getattr(self, name)}.')
    for name in ('eval_every', 'checkpoint_every'):
      if getattr(self, name) < 0:
        raise ValueError(f'Schedule.{name} must be >= 0; got '
                         f'{getattr(self, name)}.')
    # A resumed run starts a fresh window of summed metrics, so it repeats an
    # uninterrupted run's log rows only when it resumes on a log boundary.
    for name in ('checkpoint_every', 'stop_after'):
      value = getattr(self, name)
      if value and value % self.log_every and value != self.num_steps:
        raise ValueError(
            f'Schedule.{name}={value} must be a multiple of log_every='
            f'{self.log_every}, so that a resumed run logs the same windows '
            'as an uninterrupted one.')

  def _due(self, every: int, done: int) -> bool:
    return done == self.num_steps or (every > 0 and done % every == 0)

  def log_due(self, done: int) -> bool:
    return self._due(self.log_every, done)

  def eval_due(self, done: int) -> bool:
    return self._due(self.eval_every, done)

  def checkpoint_due(self, done: int) -> bool:
    return self._due(self.checkpoint_every, done) or done == self.stop_after


class LoopResult(NamedTuple):
  state: PyTree
  totals: dict[str, float]     # `counters` summed over the whole run.
  records: list[dict[str, Any]]  # Every row of metrics.jsonl.
  stopped_early: bool          # True when `Schedule.stop_after` ended it.
  seconds: float               # Wall time of this process's steps.


def mean_summary(sums: Mapping[str, Any], num_steps: int) -> dict[str, float]:
  """The default `summarize`: each metric's mean over the logged window."""
  return {k: float(v) / num_steps for k, v in sums.items()}


def _add(total, metrics):
  if total is None:
    return dict(metrics)
  return {k: jnp.add(total[k], v) for k, v in metrics.items()}


def _check_finite(record: Mapping[str, Any], done: int, unit: str) -> None:
  bad = {k: v for k, v in record.items()
         if isinstance(v, float) and not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f'Training became non-finite at {unit} {done}: {bad}. Lower the '
        'learning rate, clip gradients, or check the data.')


class _Progress:
  """Rate and ETA between two log lines."""

  def __init__(self, start: int, total: int, unit: str):
    self._t0 = self._t = time.time()
    self._last, self._total, self._unit = start, total, unit

  def line(self, done: int, record: Mapping[str, Any]) -> str:
    now = time.time()
    rate = (done - self._last) / max(now - self._t, 1e-9)
    self._t, self._last = now, done
    shown = '  '.join(f'{k} {v:.4g}' for k, v in record.items()
                      if isinstance(v, float) and k not in WALL_CLOCK_KEYS)
    eta = (self._total - done) / max(rate, 1e-9)
    return (f'{self._unit} {done}/{self._total}  {shown}  '
            f'({rate:.3g} {self._unit}s/s, ETA {eta:.0f} s)')

  def elapsed(self) -> float:
    return time.time() - self._t0


def _restore(ckpt, state, totals_like):
  """(step, state, totals) from the newest good checkpoint, or from scratch."""
  target = {'state': state, 'totals': totals_like}
  found = ckpt.restore_latest(target)
  if found is None:
    return 0, state, totals_like
  step, tree = found
  return step, tree['state'], tree['totals']


def run_loop(state: PyTree, step_fn: StepFn, schedule: Schedule, *,
             workdir: str, config: Any = None,
             eval_fn: Callable[[PyTree], Mapping[str, float]] | None = None,
             summarize: Callable[[Mapping[str, Any], int],
                                 Mapping[str, float]] = mean_summary,
             counters: Sequence[str] = (), unit: str = 'step',
             check_finite: bool = True) -> LoopResult:
  """Runs `schedule.num_steps` of `step_fn` from the newest checkpoint.

  Args:
    state: the initial state (also the structure a checkpoint restores into).
    step_fn: `(state, i) -> (state, metrics)`; metrics are scalars.
    schedule: the number of steps and the log / eval / checkpoint cadence.
    workdir: metrics.jsonl and checkpoints/ go here.
    config: recorded with each checkpoint.
    eval_fn: `state -> metrics`, run when `schedule.eval_due`.
    summarize: `(summed metrics, number of steps) -> logged metrics`.
    counters: metric names totalled over the run and checkpointed.
    unit: 'step' or 'round', the name of the step column and in log lines.
    check_finite: raise when a logged summary or evaluation is not finite.

  Returns:
    A `LoopResult`.
  """
  ckpt = checkpoint_lib.Checkpointer(workdir, config=config)
  writer = metric_writer.MetricWriter(workdir)
  zeros = {k: np.zeros((), np.float64) for k in counters}
  start, state, totals = _restore(ckpt, state, zeros)
  if start:
    logging.info('Resumed from the checkpoint at %s %d.', unit, start)
  writer.truncate_after(start)
  totals = {k: float(v) for k, v in totals.items()}
  progress = _Progress(start, schedule.num_steps, unit)
  try:
    state, stopped = _steps(state, step_fn, schedule, start, totals, ckpt,
                            writer, progress, eval_fn, summarize, unit,
                            check_finite)
  finally:
    writer.close()
    ckpt.close()
  records = metric_writer.read_metrics(writer.path)
  return LoopResult(state, totals, records, stopped, progress.elapsed())


def _steps(state, step_fn, schedule, start, totals, ckpt, writer, progress,
           eval_fn, summarize, unit, check_finite) -> tuple[PyTree, bool]:
  """The steps themselves; `totals` is updated in place."""
  window, window_steps, pending = None, 0, {k: 0.0 for k in totals}
  for i in range(start, schedule.num_steps):
    state, metrics = step_fn(state, i)
    done = i + 1
    window, window_steps = _add(window, metrics), window_steps + 1
    pending = {k: jnp.add(pending[k], metrics.get(k, 0.0)) for k in pending}
    record = {}
    if schedule.log_due(done):
      record.update(summarize(window, window_steps))
      window, window_steps = None, 0
    if eval_fn is not None and schedule.eval_due(done):
      record.update({k: float(v) for k, v in eval_fn(state).items()})
    if record:
      if check_finite:
        _check_finite(record, done, unit)
      record = {**record, 'elapsed_seconds': progress.elapsed()}
      if unit != 'step':  # MetricWriter writes the step column itself.
        record = {unit: done, **record}
      writer.write(done, record)
      logging.info('%s', progress.line(done, record))
    if schedule.checkpoint_due(done):
      for k in totals:
        totals[k] += float(pending[k])
      pending = {k: 0.0 for k in totals}
      ckpt.save(done, {'state': state,
                       'totals': {k: np.float64(v) for k, v in totals.items()}})
    if done == schedule.stop_after:
      logging.info('Stopping at %s %d as asked; rerun to resume.', unit, done)
      return state, True
  for k in totals:
    totals[k] += float(pending[k])
  return state, False
