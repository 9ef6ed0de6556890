"""Public datasets from tensorflow-datasets, as `ArrayDataset`s.

For users with network access: Speech Commands (Warden, 2018), EMNIST (Cohen
et al., 2017), Fashion-MNIST (Xiao et al., 2017) and Omniglot (Lake et al.,
2015) are downloaded and prepared by TFDS on first use, then converted to the
same arrays as the offline data:

- images: float32 [N, 28, 28, 1] in [0, 1], strokes bright on a dark
  background (as in MNIST);
- speech: float32 [N, 98, 40] log-mel features of 1 s clips at 16 kHz, from
  `ondevice.audio.log_mel`.

Examples are converted chunk by chunk, so a split never sits in memory as raw
audio or as 105x105 RGB images.

TensorFlow is optional. With it, TFDS reads its TFRecord files through
tf.data. Without it, image datasets are read through `tfds.data_source`
(ArrayRecord files, random access, no TensorFlow); Speech Commands always
needs TensorFlow, because TFDS decodes its WAV files with it.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from ondevice import audio
from ondevice.data.base import ArrayDataset

SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE  # One-second keyword clips.
IMAGE_SIDE = 28
OMNIGLOT_SIDE = 105

_EMNIST_CONFIGS = ('balanced', 'byclass', 'bymerge', 'letters', 'digits',
                   'mnist')
_NEEDS_TENSORFLOW = ('speech_commands',)
_BACKENDS = ('auto', 'tf', 'data_source')

Batch = Mapping[str, np.ndarray]


def _tensorflow_available() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def pad_or_trim(waveform: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
  """Zero-pads at the end, or cuts the end, so the last axis is `length`."""
  waveform = np.asarray(waveform)
  if waveform.shape[-1] >= length:
    return waveform[..., :length]
  pad = [(0, 0)] * (waveform.ndim - 1) + [(0, length - waveform.shape[-1])]
  return np.pad(waveform, pad)


def area_resize_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] weights that average each output pixel's source footprint.

  Output pixel i covers source interval [i * s, (i + 1) * s) with
  s = src / dst; row i holds each source pixel's overlap with it, divided by
  s, so rows sum to one. `W @ img @ W.T` is area (box-filter) resampling.
  """
  scale = src / dst
  starts = np.arange(dst)[:, None] * scale
  left = np.maximum(starts, np.arange(src)[None, :])
  right = np.minimum(starts + scale, np.arange(src)[None, :] + 1)
  return (np.clip(right - left, 0.0, None) / scale).astype(np.float32)


def _stack(examples: Iterable[Mapping[str, Any]], chunk_size: int,
           fix: Callable[[str, np.ndarray], np.ndarray]) -> Iterator[Batch]:
  """Groups single examples into batches of `chunk_size` stacked arrays."""
  rows = []
  for example in examples:
    rows.append({k: fix(k, np.asarray(v)) for k, v in example.items()})
    if len(rows) == chunk_size:
      yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
      rows = []
  if rows:
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _speech_batch(batch: Batch) -> tuple[np.ndarray, Batch]:
  waveform = batch['audio'].astype(np.float32) / 32768.0
  return np.asarray(audio.log_mel(waveform), np.float32), {}


def _image_batch(batch: Batch) -> tuple[np.ndarray, Batch]:
  return batch['image'].astype(np.float32) / 255.0, {}


def _emnist_batch(batch: Batch) -> tuple[np.ndarray, Batch]:
  # TFDS keeps EMNIST as NIST stores it (mirrored and rotated); transposing
  # height and width makes the characters upright like MNIST's digits.
  x, _ = _image_batch(batch)
  return x.transpose(0, 2, 1, 3), {}


def _omniglot_batch(batch: Batch) -> tuple[np.ndarray, Batch]:
  # Omniglot is black strokes on white, in three identical channels: average
  # to grey, invert so strokes are bright, then area-resample to 28x28.
  gray = 1.0 - batch['image'].astype(np.float32).mean(-1) / 255.0
  w = area_resize_matrix(gray.shape[-1], IMAGE_SIDE)
  x = np.einsum('ij,njk,lk->nil', w, gray, w)[..., None]
  meta = {'alphabet': batch['alphabet'].astype(np.int32),
          'alphabet_char_id': batch['alphabet_char_id'].astype(np.int32)}
  return np.clip(x, 0.0, 1.0), meta


_CONVERTERS = {
    'speech_commands': _speech_batch,
    'emnist': _emnist_batch,
    'fashion_mnist': _image_batch,
    'omniglot': _omniglot_batch,
}


def _builder_name(name: str, config: str | None) -> str:
  """'emnist' + 'byclass' -> 'emnist/byclass'; checks the pair is known."""
  if '/' in name:
    if config is not None:
      raise ValueError(f'Got a config both in name={name!r} and '
                       f'config={config!r}; give it once.')
    name, config = name.split('/', 1)
  if name not in _CONVERTERS:
    raise ValueError(f'Unknown TFDS dataset {name!r}; choose one of '
                     f'{sorted(_CONVERTERS)}.')
  if name == 'emnist':
    config = config or 'balanced'
    if config not in _EMNIST_CONFIGS:
      raise ValueError(f'Unknown EMNIST config {config!r}; choose one of '
                       f'{_EMNIST_CONFIGS}.')
    return f'emnist/{config}'
  if config is not None:
    raise ValueError(f'{name} has no builder configs; got config={config!r}. '
                     'Leave config=None.')
  return name


def _resolve_backend(name: str, backend: str) -> str:
  if backend not in _BACKENDS:
    raise ValueError(f'backend must be one of {_BACKENDS}; got {backend!r}.')
  has_tf = _tensorflow_available()
  if name in _NEEDS_TENSORFLOW and not has_tf:
    raise ImportError(
        f'TFDS decodes {name} audio with TensorFlow, which is not installed. '
        "Install it with `pip install tensorflow-cpu` (or "
        "`pip install -e '.[tfds]'`), or use the offline speech keywords.")
  if backend == 'tf' and not has_tf:
    raise ImportError("backend='tf' needs TensorFlow; install tensorflow-cpu "
                      "or use backend='data_source'.")
  if backend == 'auto':
    return 'tf' if has_tf else 'data_source'
  if backend == 'data_source' and name in _NEEDS_TENSORFLOW:
    raise ValueError(f"{name} has variable-length audio; use backend='tf' "
                     "(or 'auto').")
  return backend


def _batches(builder, split: str, backend: str, fixed_shape: bool,
             chunk_size: int) -> Iterator[Batch]:
  """Yields the split as dicts of NumPy arrays, `chunk_size` rows at a time."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def fix(key, value):
    return pad_or_trim(value) if key == 'audio' else value

  if backend == 'data_source':
    source = builder.as_data_source(split=split)
    yield from _stack((source[i] for i in range(len(source))), chunk_size, fix)
  elif fixed_shape:
    yield from tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=chunk_size))
  else:  # Ragged audio: pad clip by clip, outside TensorFlow.
    yield from _stack(tfds.as_numpy(builder.as_dataset(split=split)),
                      chunk_size, fix)


def check_arguments(name: str, config: str | None, backend: str) -> None:
  """Raises the ValueError `load_tfds` would, without loading anything."""
  _builder_name(name, config)
  if backend not in _BACKENDS:
    raise ValueError(f'backend must be one of {_BACKENDS}; got {backend!r}.')
  if backend == 'data_source' and name.split('/')[0] in _NEEDS_TENSORFLOW:
    raise ValueError(f"{name} has variable-length audio; use backend='tf' "
                     "(or 'auto').")


def _convert_split(builder, full_name: str, split: str, backend: str,
                   chunk_size: int
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(x, y, meta) of a split, converted chunk by chunk."""
  base_name = full_name.split('/')[0]
  convert = _CONVERTERS[base_name]
  xs, ys, metas = [], [], []
  for batch in _batches(builder, split, backend,
                        fixed_shape=base_name not in _NEEDS_TENSORFLOW,
                        chunk_size=chunk_size):
    x, meta = convert(batch)
    xs.append(x)
    ys.append(np.asarray(batch['label'], np.int32))
    metas.append(meta)
  if not xs:
    raise ValueError(f'TFDS split {full_name}:{split} has no examples; check '
                     'the split string.')
  meta = {k: np.concatenate([m[k] for m in metas]) for k in metas[0]}
  return np.concatenate(xs), np.concatenate(ys), meta


def load_tfds(name: str, split: str = 'train', data_dir: str | None = None,
              *, config: str | None = None, download: bool = True,
              alphabet_clients: bool = True, backend: str = 'auto',
              chunk_size: int = 1024) -> ArrayDataset:
  """Loads a TFDS dataset as arrays in the codebase's common format.

  Args:
    name: 'speech_commands', 'emnist' (or 'emnist/<config>'),
      'fashion_mnist' or 'omniglot'.
    split: any TFDS split string, e.g. 'train', 'test[:10%]'; Omniglot also
      has 'small1' and 'small2'.
    data_dir: TFDS data directory; None uses TFDS's default
      (~/tensorflow_datasets).
    config: EMNIST config, 'balanced' (47 classes, the default) or 'byclass'
      (62 classes), or another of the TFDS EMNIST configs.
    download: download and prepare the dataset when it is not in `data_dir`.
    alphabet_clients: Omniglot only: use the alphabet as client id (for
      federated few-shot experiments); otherwise client ids are -1.
    backend: 'tf' (tf.data), 'data_source' (no TensorFlow, image datasets
      only) or 'auto' (tf when TensorFlow is installed).
    chunk_size: examples converted at a time; bounds the memory of raw data.

  Returns:
    An ArrayDataset. x is float32 [N, 98, 40] log-mel for speech and
    [N, 28, 28, 1] in [0, 1] for images; y int32 is the TFDS 'label';
    client_id is -1 except for Omniglot alphabets; Omniglot's meta holds
    'alphabet' and 'alphabet_char_id'.
  """
  full_name = _builder_name(name, config)
  base_name = full_name.split('/')[0]
  backend = _resolve_backend(base_name, backend)
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1; got {chunk_size}.')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(full_name, data_dir=data_dir)
  if download:
    # The data-source backend reads ArrayRecord files; tf.data reads TFRecord.
    file_format = 'array_record' if backend == 'data_source' else None
    builder.download_and_prepare(file_format=file_format)
  x, y, meta = _convert_split(builder, full_name, split, backend, chunk_size)
  if base_name == 'omniglot' and alphabet_clients:
    client_id = meta['alphabet'].copy()
  else:
    client_id = np.full(len(y), -1, np.int32)
  features = builder.info.features
  info = {'name': full_name, 'split': split, 'source': 'tfds',
          'backend': backend}
  if base_name == 'omniglot':
    info['alphabet_names'] = tuple(features['alphabet'].names)
  return ArrayDataset(
      x=x, y=y, client_id=client_id,
      class_names=tuple(features['label'].names), meta=meta, info=info)
