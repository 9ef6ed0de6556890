"""Tests for ondevice.data.images: the IDX parser and Fashion-MNIST loader."""
import gzip
import os

import numpy as np
import pytest

from ondevice.data import images

_REAL_DIR = images.DEFAULT_DATA_DIR
_HAS_REAL = os.path.isfile(
    os.path.join(_REAL_DIR, 't10k-images-idx3-ubyte.gz'))
_needs_real = pytest.mark.skipif(
    not _HAS_REAL,
    reason=f'Fashion-MNIST not installed at {_REAL_DIR}; '
           '`apt-get install dataset-fashion-mnist`.')


def _idx_bytes(array: np.ndarray) -> bytes:
  """Encodes a uint8 array as IDX, written independently of the parser."""
  header = bytes([0, 0, 0x08, array.ndim])
  for d in array.shape:
    header += int(d).to_bytes(4, 'big')
  return header + array.astype(np.uint8).tobytes()


def _write(path, data: bytes, compress=True):
  opener = gzip.open if compress else open
  with opener(str(path), 'wb') as f:
    f.write(data)
  return str(path)


def _write_split(directory, prefix, x, y):
  _write(directory / f'{prefix}-images-idx3-ubyte.gz', _idx_bytes(x))
  _write(directory / f'{prefix}-labels-idx1-ubyte.gz', _idx_bytes(y))


def test_read_idx_roundtrip_gz_and_plain(tmp_path):
  arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  gz = _write(tmp_path / 'a-idx3-ubyte.gz', _idx_bytes(arr))
  plain = _write(tmp_path / 'a-idx3-ubyte', _idx_bytes(arr), compress=False)
  np.testing.assert_array_equal(images.read_idx(gz), arr)
  np.testing.assert_array_equal(images.read_idx(plain), arr)
  assert images.read_idx(gz).dtype == np.uint8


def test_read_idx_truncated_data_names_file(tmp_path):
  arr = np.ones((3, 28, 28), np.uint8)
  path = _write(tmp_path / 'short.gz', _idx_bytes(arr)[:-10])
  with pytest.raises(ValueError, match='short.gz.*truncated'):
    images.read_idx(path)


def test_read_idx_extra_bytes(tmp_path):
  arr = np.ones((3,), np.uint8)
  path = _write(tmp_path / 'long.gz', _idx_bytes(arr) + b'\x00')
  with pytest.raises(ValueError, match='long.gz.*holds 4 bytes'):
    images.read_idx(path)


def test_read_idx_truncated_header(tmp_path):
  arr = np.ones((3, 28, 28), np.uint8)
  path = _write(tmp_path / 'hdr.gz', _idx_bytes(arr)[:9])
  with pytest.raises(ValueError, match='hdr.gz.*inside its header'):
    images.read_idx(path)


def test_read_idx_truncated_gzip_stream(tmp_path):
  arr = np.random.default_rng(0).integers(0, 255, (50, 28, 28), np.uint8)
  full = gzip.compress(_idx_bytes(arr))
  path = tmp_path / 'cut.gz'
  path.write_bytes(full[:len(full) // 2])
  with pytest.raises(ValueError, match='cut.gz'):
    images.read_idx(str(path))


def test_read_idx_bad_magic(tmp_path):
  arr = np.ones((2, 2), np.uint8)
  data = bytearray(_idx_bytes(arr))
  data[2] = 0x0D  # float32 type code: not supported.
  path = _write(tmp_path / 'magic.gz', bytes(data))
  with pytest.raises(ValueError, match=r'magic.gz.*0x00000d02'):
    images.read_idx(path)


def test_load_from_small_files(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
  x[0, 0, 0], x[0, 0, 1] = 0, 255
  y = np.array([0, 1, 2, 9, 9, 3, 4], np.uint8)
  _write_split(tmp_path, 't10k', x, y)
  ds = images.load_fashion_mnist('test', data_dir=str(tmp_path))
  assert ds.x.shape == (7, 28, 28, 1) and ds.x.dtype == np.float32
  assert ds.x[0, 0, 0, 0] == 0.0 and ds.x[0, 0, 1, 0] == 1.0
  np.testing.assert_allclose(ds.x[..., 0] * 255, x, atol=1e-4)
  assert ds.y.dtype == np.int32
  np.testing.assert_array_equal(ds.y, y)
  np.testing.assert_array_equal(ds.client_id, -1)
  assert ds.class_names == images.FASHION_MNIST_CLASSES


def test_load_rejects_wrong_image_size(tmp_path):
  _write_split(tmp_path, 't10k', np.zeros((2, 27, 28), np.uint8),
               np.zeros(2, np.uint8))
  with pytest.raises(ValueError, match='t10k-images.*expected'):
    images.load_fashion_mnist('test', data_dir=str(tmp_path))


def test_load_rejects_label_count_mismatch(tmp_path):
  _write_split(tmp_path, 't10k', np.zeros((2, 28, 28), np.uint8),
               np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match='t10k-labels'):
    images.load_fashion_mnist('test', data_dir=str(tmp_path))


def test_load_rejects_label_out_of_range(tmp_path):
  _write_split(tmp_path, 't10k', np.zeros((2, 28, 28), np.uint8),
               np.array([0, 10], np.uint8))
  with pytest.raises(ValueError, match='label 10'):
    images.load_fashion_mnist('test', data_dir=str(tmp_path))


def test_missing_files_say_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match='apt-get install dataset-fashion-mnist'):
    images.load_fashion_mnist('train', data_dir=str(tmp_path / 'nowhere'))


def test_bad_split():
  with pytest.raises(ValueError, match="'validation'"):
    images.load_fashion_mnist('validation')


@_needs_real
@pytest.mark.parametrize('split,n', [('train', 60000), ('test', 10000)])
def test_real_fashion_mnist(split, n):
  ds = images.load_fashion_mnist(split)
  assert len(ds) == n
  assert ds.x.shape == (n, 28, 28, 1) and ds.x.dtype == np.float32
  assert ds.y.dtype == np.int32 and ds.client_id.dtype == np.int32
  assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
  assert ds.x.max() == 1.0  # Some pixel is saturated.
  np.testing.assert_array_equal(np.bincount(ds.y, minlength=10),
                                np.full(10, n // 10))
  assert ds.num_classes == 10
