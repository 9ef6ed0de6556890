"""One user's life after pre-training: enrollment, then the stream in chunks.

    enrolled = enroll(fns, state, split.enroll_x, split.enroll_y, ...)
    verifier = calibrate_verifier(fns, enrolled.params, ..., target_far)
    curve, quality = run_stream(fns, settings, enrolled, stream, verifier, ...)

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
deterministic function of its key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from continual import pseudo_label as pl
from continual import replay
from continual import streams
from ondevice import train

PyTree = Any
METHODS = ('pseudo_label', 'bn_adapt', 'tent')


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
                       f'config.learner.method to one of {METHODS}.')
    if self.steps_per_chunk < 0 or self.batch_size < 1:
      raise ValueError('steps_per_chunk must be >= 0 and batch_size >= 1; '
                       f'got {self.steps_per_chunk} and {self.batch_size}.')


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


def enroll(step: Callable, state: train.TrainState, x: np.ndarray,
           y: np.ndarray, num_steps: int, batch_size: int,
           key: jax.Array) -> train.TrainState:
  """Fine-tunes on the enrollment clips, batches drawn per epoch."""
  n = len(x)
  for i in range(num_steps):
    epoch, offset = divmod(i * batch_size, n)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch),
                                             n))
    index = np.resize(np.roll(perm, -offset), batch_size)
    batch = {'x': x[index], 'y': y[index],
             'mask': np.ones(batch_size, np.float32)}
    state, _ = step(state, batch, jax.random.fold_in(key, 10**6 + i))
  return state


def calibrate_verifier(embed: Callable, params: PyTree, model_state: PyTree,
                       x: np.ndarray, y: np.ndarray, num_classes: int,
                       target_far: float, batch_size: int = 128) -> Verifier:
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
                        buffer, key):
  """The train steps of one chunk; returns (state, mean loss)."""
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
    losses.append(float(metrics['loss']))
  return state, float(np.mean(losses)) if losses else float('nan')


def _tent_steps(fns, settings, state, chunk_x, key):
  losses = []
  for i in range(settings.steps_per_chunk):
    step_key = jax.random.fold_in(key, i)
    rows_key, train_key = jax.random.split(step_key)
    index = _pick(rows_key, np.arange(len(chunk_x)), settings.batch_size)
    batch = {'x': chunk_x[index], 'y': np.zeros(len(index), np.int32),
             'mask': np.ones(len(index), np.float32)}
    state, metrics = fns.tent_step(state, batch, train_key)
    losses.append(float(metrics['loss']))
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
             stream, chunk, seen, stream_scores, chunk_size):
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
                chunk.x, chunk_size)
  return teacher_state, np.asarray(pl.template_scores(verifier.templates,
                                                      emb))


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
  if settings.teacher_bn and fns.adapt_bn is None:
    raise ValueError('Settings.teacher_bn needs Functions.adapt_bn (see '
                     'tta.adapt_batch_norm); pass it or set teacher_bn=False.')
  source_state = state.model_state
  enrolled_params = state.params
  buffer = None
  if settings.method == 'pseudo_label' and settings.replay_capacity:
    buffer = replay.init(settings.replay_capacity,
                         {'x': enroll_x[0], 'y': np.int32(0)})
    buffer = replay.add(buffer, {'x': enroll_x, 'y': enroll_y.astype(np.int32)},
                        np.ones(len(enroll_x), bool), jax.random.fold_in(key, 0))
  curve = [dict(chunk=0, clips=0, drift=0.0, **evaluate(
      state.params, state.model_state, 0.0))]
  all_labels = np.zeros(len(stream), np.int32)
  all_accepted = np.zeros(len(stream), bool)
  seen = 0
  for index, chunk in enumerate(stream.chunks(chunk_size), start=1):
    chunk_key = jax.random.fold_in(key, index)
    labels = np.zeros(len(chunk), np.int32)
    accepted = np.zeros(len(chunk), bool)
    loss = float('nan')
    if settings.method == 'pseudo_label':
      teacher_state, scores = _teacher(
          fns, settings, state, enrolled_params, source_state, verifier,
          stream, chunk, seen, stream_scores, chunk_size)
      logits = batched(lambda b: fns.classify(state.params, teacher_state, b),
                       chunk.x, chunk_size)
      result = _label(logits, scores, settings.confidence,
                      verifier.threshold, verify=settings.verify)
      labels = np.asarray(result.labels, np.int32)
      accepted = np.asarray(result.accepted)
      if buffer is not None:
        buffer = replay.add(buffer, {'x': chunk.x, 'y': labels}, accepted,
                            jax.random.fold_in(chunk_key, 1))
      state, loss = _pseudo_label_steps(fns, settings, state, chunk.x, labels,
                                        accepted, buffer,
                                        jax.random.fold_in(chunk_key, 2))
    elif settings.method == 'bn_adapt':
      state = state._replace(model_state=fns.adapt_bn(
          state.params, source_state,
          *_recent(stream, seen + len(chunk), settings.bn_window)))
    else:
      state, loss = _tent_steps(fns, settings, state, chunk.x, chunk_key)
    all_labels[seen:seen + len(chunk)] = labels
    all_accepted[seen:seen + len(chunk)] = accepted
    seen += len(chunk)
    so_far = slice(0, seen)
    quality = pl.label_quality(
        all_labels[so_far], all_accepted[so_far], stream.label[so_far],
        stream.source[so_far] == streams.SOURCES.index('user_keyword'))
    drift = float(chunk.drift[-1])
    curve.append(dict(chunk=index, clips=seen, drift=drift, loss=loss,
                      accepted=int(accepted.sum()),
                      precision=quality['precision'],
                      recall=quality['recall'],
                      **evaluate(state.params, state.model_state, drift)))
  by_source = {}
  for s, name in enumerate(streams.SOURCES):
    rows = stream.source == s
    by_source[name] = {
        'clips': int(rows.sum()),
        'accepted': int(all_accepted[rows].sum()),
        'correct': int((all_accepted & rows &
                        (all_labels == stream.label)).sum())}
  quality = pl.label_quality(
      all_labels, all_accepted, stream.label,
      stream.source == streams.SOURCES.index('user_keyword'))
  quality['by_source'] = by_source
  return curve, quality, state
