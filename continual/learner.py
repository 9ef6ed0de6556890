"""One user's life after pre-training: enrollment, then the stream in chunks.

    state = enroll(fns.enroll_step, state, split.enroll_x, split.enroll_y,
                   num_steps, batch_size, key)
    verifier = calibrate_verifier(fns.embed, state.params, state.model_state,
                                  split.enroll_x, split.enroll_y, num_classes,
                                  target_far)
    curve, quality, final = run_stream(
        fns, settings, state, stream, chunk_size, verifier, stream_scores,
        split.enroll_x, split.enroll_y, evaluate, key)

Enrollment fine-tunes the pre-trained model on the user's K labelled
utterances of every keyword. The verifier (templates and a threshold) is
built once from the enrolled model and kept fixed while the classifier
keeps learning, so its calibration stays valid.

Each chunk of the stream is first labelled by the current model (so the
measured pseudo-label quality is what training really sees), then the
model takes a few pure train steps `(state, batch, rng) -> (state,
metrics)`. With `teacher_bn` the labelling model (classifier and verifier)
normalises with batch-norm statistics adapted to the clips heard recently
(Schneider et al. 2020), so labels follow acoustics that drift after
enrollment, while the student trains with the source statistics and keeps
them. Methods:

  pseudo_label  steps on accepted pseudo-labels (+ a reservoir replay buffer
                seeded with the enrollment clips), with the unlabelled clips
                of the chunk as extra distillation rows (mask 0,
                distill_mask 1) when the regulariser distils;
  bn_adapt      no training: batch-norm statistics re-estimated on the clips
                heard so far (tta.adapt_batch_norm);
  tent          entropy-minimisation steps on the chunk's clips (tta).

Every draw comes from `jax.random.fold_in(key, ...)`, so a run is a
deterministic function of its key. A non-finite training loss stops the run
with a FloatingPointError that names the chunk and the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from continual import pseudo_label as pl
from continual import replay
from continual import streams
from ondevice import batching
from ondevice import train

PyTree = Any
METHODS = ('pseudo_label', 'bn_adapt', 'tent')
# Rows per inference call (labelling, embedding): one fixed, padded shape,
# so each jitted function compiles once whatever the chunk size.
INFERENCE_BATCH = 128


class Functions(NamedTuple):
  """Jitted pieces shared by every user of one run variant.

  classify: (params, model_state, x) -> logits.
  embed: (params, model_state, x) -> embeddings (the verifier's).
  train_step / enroll_step / tent_step: pure steps (None when unused).
  adapt_bn: (params, model_state, x, mask) -> model_state, or None.
  """
  classify: Callable
  embed: Callable
  train_step: Callable | None
  enroll_step: Callable | None
  tent_step: Callable | None
  adapt_bn: Callable | None


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a variant does with each chunk (from the config's learner block)."""
  method: str = 'pseudo_label'
  steps_per_chunk: int = 8
  batch_size: int = 32
  distill_batch_size: int = 0
  replay_capacity: int = 256
  confidence: float = 0.5
  verify: bool = True
  bn_window: int = 512
  teacher_bn: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'Unknown learner method {self.method!r}; set '
                       f'config.learner.method.name to one of {METHODS}.')
    if self.steps_per_chunk < 0 or self.batch_size < 1:
      raise ValueError('steps_per_chunk must be >= 0 and batch_size >= 1; '
                       f'got {self.steps_per_chunk} and {self.batch_size}.')
    if min(self.distill_batch_size, self.replay_capacity) < 0 or (
        self.bn_window < 1):
      raise ValueError('distill_batch_size and replay_capacity must be >= 0 '
                       f'and bn_window >= 1; got {self.distill_batch_size}, '
                       f'{self.replay_capacity} and {self.bn_window}.')
    if self.teacher_bn and self.method != 'pseudo_label':
      # Only pseudo-labelling has a teacher; the other methods never label.
      raise ValueError(f'teacher_bn applies to method pseudo_label only; got '
                       f'method {self.method!r}.')


class Verifier(NamedTuple):
  templates: pl.Templates
  threshold: float
  enrollment_far: float
  enrollment_frr: float


def batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over x in fixed-size padded batches (one compilation)."""
  out = []
  for start in range(0, len(x), batch_size):
    part = np.asarray(x[start:start + batch_size])
    pad = batch_size - len(part)
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:],
                                            part.dtype)])
    out.append(np.asarray(fn(part))[:batch_size - pad])
  return np.concatenate(out)


def check_finite(loss: float, where: str) -> float:
  """Returns `loss`; raises FloatingPointError naming `where` if not finite."""
  if not np.isfinite(loss):
    raise FloatingPointError(f'Non-finite training loss {loss} at {where}; '
                             'lower the learning rate or check the data.')
  return loss


def enroll(step: Callable, state: train.TrainState, x: np.ndarray,
           y: np.ndarray, num_steps: int, batch_size: int,
           key: jax.Array) -> train.TrainState:
  """Fine-tunes on the enrollment clips, a fresh order every epoch."""
  batches = batching.EpochBatches(key, len(x), batch_size,
                                  drop_remainder=False)
  for i in range(num_steps):
    state, metrics = step(state, batches.batch(i, x, y),
                          jax.random.fold_in(key, 10**6 + i))
    check_finite(float(metrics['loss']), f'enrollment step {i}')
  return state


def calibrate_verifier(embed: Callable, params: PyTree, model_state: PyTree,
                       x: np.ndarray, y: np.ndarray, num_classes: int,
                       target_far: float,
                       batch_size: int = INFERENCE_BATCH) -> Verifier:
  """Templates of the enrollment clips and a threshold at `target_far`."""
  emb = batched(lambda b: embed(params, model_state, b), x, batch_size)
  templates = pl.build_templates(emb, y, num_classes)
  genuine, impostor = pl.enrollment_trials(templates, emb, y)
  threshold = pl.calibrate_threshold(impostor, target_far)
  genuine = np.asarray(genuine)
  genuine = genuine[np.isfinite(genuine)]
  frr = float(np.mean(genuine < threshold)) if genuine.size else float('nan')
  return Verifier(templates, threshold,
                  pl.false_accept_rate(impostor, threshold), frr)


_label = jax.jit(pl.pseudo_label, static_argnames='verify')


def _pick(key: jax.Array, candidates: np.ndarray, count: int) -> np.ndarray:
  """`count` draws with replacement from `candidates`."""
  return candidates[streams.host_rng(key).integers(0, len(candidates), count)]


def _labelled_rows(key, settings, x, labels, accepted, buffer):
  """Pseudo-labelled rows of one step: this chunk's and replayed ones."""
  size = settings.batch_size
  fresh = np.flatnonzero(accepted)
  n_replay = size // 2 if buffer is not None else 0
  n_fresh = size - n_replay if len(fresh) else 0
  fresh_key, replay_key = jax.random.split(key)
  xs, ys, masks = [], [], []
  if n_fresh:
    index = _pick(fresh_key, fresh, n_fresh)
    xs.append(x[index])
    ys.append(labels[index])
    masks.append(np.ones(n_fresh, np.float32))
  rest = size - n_fresh
  if buffer is not None and rest:
    items, mask = replay.sample(buffer, replay_key, rest)
    xs.append(np.asarray(items['x']))
    ys.append(np.asarray(items['y']))
    masks.append(np.asarray(mask))
  elif rest:
    xs.append(np.zeros((rest,) + x.shape[1:], np.float32))
    ys.append(np.zeros(rest, np.int32))
    masks.append(np.zeros(rest, np.float32))
  return np.concatenate(xs), np.concatenate(ys), np.concatenate(masks)


def _pseudo_label_steps(fns, settings, state, chunk_x, labels, accepted,
                        buffer, key, chunk):
  """The train steps of chunk `chunk`; returns (state, mean loss)."""
  losses = []
  for i in range(settings.steps_per_chunk):
    step_key = jax.random.fold_in(key, i)
    rows_key, distill_key, train_key = jax.random.split(step_key, 3)
    x, y, mask = _labelled_rows(rows_key, settings, chunk_x, labels,
                                accepted, buffer)
    if not mask.any():
      break
    distill = mask.copy()
    if settings.distill_batch_size:
      index = _pick(distill_key, np.arange(len(chunk_x)),
                    settings.distill_batch_size)
      x = np.concatenate([x, chunk_x[index]])
      y = np.concatenate([y, np.zeros(len(index), np.int32)])
      mask = np.concatenate([mask, np.zeros(len(index), np.float32)])
      distill = np.concatenate([distill, np.ones(len(index), np.float32)])
    batch = {'x': x, 'y': y.astype(np.int32), 'mask': mask,
             'distill_mask': distill}
    state, metrics = fns.train_step(state, batch, train_key)
    losses.append(check_finite(float(metrics['loss']),
                               f'stream chunk {chunk}, step {i}'))
  return state, float(np.mean(losses)) if losses else float('nan')


def _tent_steps(fns, settings, state, chunk_x, key, chunk):
  """TENT's steps on chunk `chunk`; returns (state, mean loss)."""
  losses = []
  for i in range(settings.steps_per_chunk):
    step_key = jax.random.fold_in(key, i)
    rows_key, train_key = jax.random.split(step_key)
    index = _pick(rows_key, np.arange(len(chunk_x)), settings.batch_size)
    batch = {'x': chunk_x[index], 'y': np.zeros(len(index), np.int32),
             'mask': np.ones(len(index), np.float32)}
    state, metrics = fns.tent_step(state, batch, train_key)
    losses.append(check_finite(float(metrics['loss']),
                               f'stream chunk {chunk}, TENT step {i}'))
  return state, float(np.mean(losses)) if losses else float('nan')


def _recent(stream: streams.Stream, end: int, window: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """The last `window` clips heard before `end`, zero-padded, and a mask."""
  heard = stream.x[max(0, end - window):end]
  pad = window - len(heard)
  padded = np.concatenate([heard, np.zeros((pad,) + heard.shape[1:],
                                           np.float32)])
  mask = np.concatenate([np.ones(len(heard)), np.zeros(pad)]).astype(
      np.float32)
  return padded, mask


def _teacher(fns, settings, state, enrolled_params, source_state, verifier,
             stream, chunk, seen, stream_scores):
  """Model state that labels a chunk, and the chunk's template scores.

  Without `teacher_bn` the current model labels with its own statistics and
  the precomputed scores (enrolled model, source statistics) verify. With
  it, both the classifier and the verifier's embedding network normalise
  with batch-norm statistics adapted to the clips heard recently
  (Schneider et al. 2020): labels and verification follow the current
  acoustics, while the student keeps training with the source statistics.
  """
  here = slice(seen, seen + len(chunk))
  if not settings.teacher_bn:
    return state.model_state, stream_scores[here]
  window = _recent(stream, seen + len(chunk), settings.bn_window)
  teacher_state = fns.adapt_bn(state.params, source_state, *window)
  verify_state = fns.adapt_bn(enrolled_params, source_state, *window)
  emb = batched(lambda b: fns.embed(enrolled_params, verify_state, b),
                chunk.x, INFERENCE_BATCH)
  return teacher_state, np.asarray(pl.template_scores(verifier.templates,
                                                      emb))


def _init_replay(settings: Settings, enroll_x: np.ndarray,
                 enroll_y: np.ndarray, key: jax.Array
                 ) -> replay.ReplayBuffer | None:
  """A replay buffer seeded with the enrollment clips, or None."""
  if settings.method != 'pseudo_label' or not settings.replay_capacity:
    return None
  buffer = replay.init(settings.replay_capacity,
                       {'x': enroll_x[0], 'y': np.int32(0)})
  return replay.add(buffer, {'x': enroll_x, 'y': enroll_y.astype(np.int32)},
                    np.ones(len(enroll_x), bool), key)


class _Run(NamedTuple):
  """What one user's stream keeps fixed from start to end."""
  fns: Functions
  settings: Settings
  stream: streams.Stream
  verifier: Verifier
  stream_scores: np.ndarray
  enrolled_params: PyTree
  source_state: PyTree


def _pseudo_label_chunk(run: _Run, state, buffer, chunk, seen: int,
                        index: int, key):
  """Labels chunk `index`, replays and trains; returns the new pieces."""
  teacher_state, scores = _teacher(
      run.fns, run.settings, state, run.enrolled_params, run.source_state,
      run.verifier, run.stream, chunk, seen, run.stream_scores)
  logits = batched(lambda b: run.fns.classify(state.params, teacher_state, b),
                   chunk.x, INFERENCE_BATCH)
  result = _label(logits, scores, run.settings.confidence,
                  run.verifier.threshold, verify=run.settings.verify)
  labels = np.asarray(result.labels, np.int32)
  accepted = np.asarray(result.accepted)
  if buffer is not None:
    buffer = replay.add(buffer, {'x': chunk.x, 'y': labels}, accepted,
                        jax.random.fold_in(key, 1))
  state, loss = _pseudo_label_steps(
      run.fns, run.settings, state, chunk.x, labels, accepted, buffer,
      jax.random.fold_in(key, 2), index)
  return state, buffer, labels, accepted, loss


def _chunk(run: _Run, state, buffer, chunk, seen: int, index: int, key):
  """One chunk under the run's method.

  Returns:
    (state, buffer, labels, accepted, loss); nothing is accepted unless the
    method pseudo-labels, and bn_adapt has no loss (NaN).
  """
  none = np.zeros(len(chunk), np.int32), np.zeros(len(chunk), bool)
  if run.settings.method == 'pseudo_label':
    return _pseudo_label_chunk(run, state, buffer, chunk, seen, index, key)
  if run.settings.method == 'bn_adapt':
    state = state._replace(model_state=run.fns.adapt_bn(
        state.params, run.source_state,
        *_recent(run.stream, seen + len(chunk), run.settings.bn_window)))
    return (state, buffer) + none + (float('nan'),)
  state, loss = _tent_steps(run.fns, run.settings, state, chunk.x, key, index)
  return (state, buffer) + none + (loss,)


def _quality(stream: streams.Stream, labels: np.ndarray, accepted: np.ndarray
             ) -> dict[str, Any]:
  """Label quality over the whole stream, also per source."""
  by_source = {}
  for s, name in enumerate(streams.SOURCES):
    rows = stream.source == s
    by_source[name] = {
        'clips': int(rows.sum()),
        'accepted': int(accepted[rows].sum()),
        'correct': int((accepted & rows & (labels == stream.label)).sum())}
  quality = pl.label_quality(
      labels, accepted, stream.label,
      stream.source == streams.SOURCES.index('user_keyword'))
  quality['by_source'] = by_source
  return quality


def _check_functions(fns: Functions, settings: Settings) -> None:
  needs_bn = settings.method == 'bn_adapt' or settings.teacher_bn
  if needs_bn and fns.adapt_bn is None:
    raise ValueError(f'Method {settings.method!r} with teacher_bn='
                     f'{settings.teacher_bn} needs Functions.adapt_bn (see '
                     'tta.adapt_batch_norm).')
  step = {'pseudo_label': fns.train_step, 'tent': fns.tent_step}
  if step.get(settings.method, fns.classify) is None:
    raise ValueError(f'Method {settings.method!r} needs its step in '
                     'Functions (train_step or tent_step).')


def run_stream(fns: Functions, settings: Settings, state: train.TrainState,
               stream: streams.Stream, chunk_size: int, verifier: Verifier,
               stream_scores: np.ndarray, enroll_x: np.ndarray,
               enroll_y: np.ndarray,
               evaluate: Callable[[PyTree, PyTree, float], dict[str, float]],
               key: jax.Array
               ) -> tuple[list[dict[str, float]], dict, train.TrainState]:
  """Runs one user's stream; returns (curve, label quality, final state).

  Args:
    fns: jitted functions of this variant.
    settings: the variant's learner settings.
    state: the enrolled model's train state.
    stream: the user's stream.
    chunk_size: clips per chunk.
    verifier: templates and threshold (from the enrolled model).
    stream_scores: [N, C] template similarities of the stream's clips.
    enroll_x, enroll_y: enrollment clips, which seed the replay buffer.
    evaluate: (params, model_state, drift level) -> {'user_accuracy',
      'global_accuracy'} of a model.
    key: PRNG key of the run.

  Returns:
    One record per point in time (after 0, 1, ... chunks); label quality
    over the whole stream, also by source (nothing is accepted unless the
    method pseudo-labels); and the final train state.
  """
  _check_functions(fns, settings)
  run = _Run(fns, settings, stream, verifier, stream_scores,
             state.params, state.model_state)
  buffer = _init_replay(settings, enroll_x, enroll_y,
                        jax.random.fold_in(key, 0))
  curve = [dict(chunk=0, clips=0, drift=0.0, **evaluate(
      state.params, state.model_state, 0.0))]
  all_labels = np.zeros(len(stream), np.int32)
  all_accepted = np.zeros(len(stream), bool)
  seen = 0
  for index, chunk in enumerate(stream.chunks(chunk_size), start=1):
    state, buffer, labels, accepted, loss = _chunk(
        run, state, buffer, chunk, seen, index, jax.random.fold_in(key, index))
    all_labels[seen:seen + len(chunk)] = labels
    all_accepted[seen:seen + len(chunk)] = accepted
    seen += len(chunk)
    quality = pl.label_quality(
        all_labels[:seen], all_accepted[:seen], stream.label[:seen],
        stream.source[:seen] == streams.SOURCES.index('user_keyword'))
    drift = float(chunk.drift[-1])
    curve.append(dict(chunk=index, clips=seen, drift=drift, loss=loss,
                      accepted=int(accepted.sum()),
                      precision=quality['precision'],
                      recall=quality['recall'],
                      **evaluate(state.params, state.model_state, drift)))
  return curve, _quality(stream, all_labels, all_accepted), state
