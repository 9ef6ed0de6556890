"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, offline.

The package installs the four gzipped IDX files of Xiao et al. (2017),
"Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", under /usr/share/datasets/fashion-mnist. They are parsed here with
NumPy alone, so image experiments run without a network or TensorFlow.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header of two
zero bytes, a type byte (0x08 = unsigned byte), a byte giving the number of
dimensions, one big-endian uint32 per dimension, then the values row-major.
"""
from __future__ import annotations

import gzip
import os

import numpy as np

from ondevice.data.base import ArrayDataset

DEFAULT_DATA_DIR = '/usr/share/datasets/fashion-mnist'

FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)

_FILE_PREFIX = {'train': 'train', 'test': 't10k'}
_UBYTE_TYPE = 0x08
_IMAGE_SIDE = 28


def read_idx(path: str) -> np.ndarray:
  """Reads an unsigned-byte IDX file (gzipped when `path` ends in .gz).

  Args:
    path: IDX file, e.g. 'train-images-idx3-ubyte.gz'.

  Returns:
    uint8 array whose shape is the one the header declares.

  Raises:
    ValueError: the header is not an unsigned-byte IDX header, or the file
      holds fewer or more bytes than its header declares.
  """
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # A truncated gzip stream lands here.
    raise ValueError(f'Cannot read IDX file {path}: {e}. The file is corrupt '
                     'or truncated; reinstall it.') from e
  if len(raw) < 4:
    raise ValueError(f'IDX file {path} has {len(raw)} bytes, fewer than the '
                     '4-byte magic number; the file is truncated.')
  zero0, zero1, dtype_code, ndim = raw[0], raw[1], raw[2], raw[3]
  if zero0 or zero1 or dtype_code != _UBYTE_TYPE or ndim == 0:
    magic = int.from_bytes(raw[:4], 'big')
    raise ValueError(
        f'IDX file {path} starts with magic number 0x{magic:08x}; expected '
        f'0x0000{_UBYTE_TYPE:02x}0N (unsigned bytes, N dimensions). It is not '
        'an unsigned-byte IDX file.')
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise ValueError(f'IDX file {path} declares {ndim} dimensions but ends '
                     'inside its header; the file is truncated.')
  dims = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
  expected = int(np.prod(dims, dtype=np.int64))
  got = len(raw) - header_len
  if got != expected:
    raise ValueError(
        f'IDX file {path} declares shape {dims} ({expected} bytes of data) but '
        f'holds {got} bytes; the file is truncated or corrupt.')
  return np.frombuffer(raw, np.uint8, offset=header_len).reshape(dims)


def _missing_file_error(path: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'Fashion-MNIST file {path} not found. Install the Debian package with '
      '`sudo apt-get install dataset-fashion-mnist` (or run `make demo`, '
      'which installs it), or pass data_dir= pointing at a directory holding '
      'the four *-ubyte.gz files.')


def load_fashion_mnist(split: str = 'train',
                       data_dir: str = DEFAULT_DATA_DIR) -> ArrayDataset:
  """Loads one split of Fashion-MNIST from the IDX files in `data_dir`.

  Args:
    split: 'train' (60,000 examples) or 'test' (10,000 examples).
    data_dir: directory with train-images-idx3-ubyte.gz,
      train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
      t10k-labels-idx1-ubyte.gz.

  Returns:
    An ArrayDataset with x float32 [N, 28, 28, 1] in [0, 1], y int32 [N],
    client_id all -1 (partition with `ondevice.data.partition`).

  Raises:
    ValueError: unknown split, or a malformed file.
    FileNotFoundError: the files are missing.
  """
  if split not in _FILE_PREFIX:
    raise ValueError(f'split must be one of {sorted(_FILE_PREFIX)}; got '
                     f'{split!r}.')
  prefix = _FILE_PREFIX[split]
  image_path = os.path.join(data_dir, f'{prefix}-images-idx3-ubyte.gz')
  label_path = os.path.join(data_dir, f'{prefix}-labels-idx1-ubyte.gz')
  for path in (image_path, label_path):
    if not os.path.isfile(path):
      raise _missing_file_error(path)

  images = read_idx(image_path)
  labels = read_idx(label_path)
  if images.ndim != 3 or images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
    raise ValueError(f'IDX file {image_path} holds shape {images.shape}; '
                     f'expected [N, {_IMAGE_SIDE}, {_IMAGE_SIDE}] images.')
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f'IDX file {label_path} holds shape {labels.shape}; '
                     f'expected [{len(images)}] labels to match {image_path}.')
  if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
    raise ValueError(f'IDX file {label_path} has label {labels.max()}; '
                     f'Fashion-MNIST labels lie in [0, '
                     f'{len(FASHION_MNIST_CLASSES)}).')

  x = (images.astype(np.float32) / 255.0)[..., None]
  return ArrayDataset(
      x=x,
      y=labels.astype(np.int32),
      client_id=np.full(len(labels), -1, np.int32),
      class_names=FASHION_MNIST_CLASSES,
      info={'name': 'fashion_mnist', 'split': split, 'data_dir': data_dir})
