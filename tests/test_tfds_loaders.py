"""Tests for ondevice.data.tfds_loaders, offline through TFDS's mock data.

`tfds.testing.mock_data` replaces download_and_prepare with a no-op and makes
builders yield random examples drawn from their feature specs (or examples a
test supplies), so the real builders, feature specs and our conversion code
run without a network.
"""
import importlib.util

import numpy as np
import pytest

from ondevice import audio
from ondevice.data import tfds_loaders

tfds = pytest.importorskip('tensorflow_datasets')

_HAS_TF = importlib.util.find_spec('tensorflow') is not None
_needs_tf = pytest.mark.skipif(
    not _HAS_TF, reason='TensorFlow is not installed; TFDS needs it to decode '
    "speech_commands audio (pip install -e '.[tfds]').")


def _mock(num_examples=7, **kwargs):
  return tfds.testing.mock_data(num_examples=num_examples, **kwargs)


@pytest.mark.parametrize('name,config,num_classes', [
    ('emnist', None, 47),
    ('emnist', 'byclass', 62),
    ('fashion_mnist', None, 10),
    ('omniglot', None, 1623),
])
@pytest.mark.parametrize('backend', [
    pytest.param('tf', marks=_needs_tf), 'data_source'])
def test_image_datasets(name, config, num_classes, backend):
  # 7 examples in chunks of 3 exercises the short last chunk.
  with _mock(7):
    ds = tfds_loaders.load_tfds(name, 'train', config=config,
                                backend=backend, chunk_size=3)
  assert len(ds) == 7
  assert ds.x.shape == (7, 28, 28, 1) and ds.x.dtype == np.float32
  assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.std() > 0
  assert ds.y.dtype == np.int32 and ds.client_id.dtype == np.int32
  assert ds.num_classes == num_classes
  assert 0 <= ds.y.min() and ds.y.max() < num_classes
  assert ds.info['backend'] == backend
  if name == 'omniglot':
    np.testing.assert_array_equal(ds.client_id, ds.meta['alphabet'])
    assert 0 <= ds.client_id.min() and ds.client_id.max() < 50
    assert len(ds.info['alphabet_names']) == 50
  else:
    np.testing.assert_array_equal(ds.client_id, -1)


def test_emnist_name_with_config_and_default():
  with _mock(2):
    assert tfds_loaders.load_tfds('emnist/byclass').num_classes == 62
    assert tfds_loaders.load_tfds('emnist').info['name'] == 'emnist/balanced'


def _fixed_source(examples):
  def as_data_source(self, *args, **kwargs):
    del self, args, kwargs
    return examples
  return as_data_source


def test_emnist_is_transposed():
  image = np.zeros((28, 28, 1), np.uint8)
  image[0, 5] = 255  # Row 0, column 5 -> row 5, column 0 after transposing.
  with _mock(as_data_source_fn=_fixed_source([{'image': image, 'label': 3}])):
    ds = tfds_loaders.load_tfds('emnist', backend='data_source')
  assert ds.x[0, 5, 0, 0] == 1.0 and ds.x.sum() == 1.0
  np.testing.assert_array_equal(ds.y, [3])


def test_omniglot_grey_inverted_and_area_resized():
  white = np.full((105, 105, 3), 255, np.uint8)
  ink = np.zeros_like(white)  # All black: every output pixel is full ink.
  half = white.copy()
  half[:, :60] = 0  # Columns 0-59 black: 60 / 3.75 = 16 output columns.
  examples = [
      {'image': im, 'label': i, 'alphabet': 10 + i, 'alphabet_char_id': i}
      for i, im in enumerate([white, ink, half])]
  with _mock(as_data_source_fn=_fixed_source(examples)):
    ds = tfds_loaders.load_tfds('omniglot', backend='data_source')
    no_clients = tfds_loaders.load_tfds('omniglot', backend='data_source',
                                        alphabet_clients=False)
  np.testing.assert_allclose(ds.x[0], 0.0, atol=1e-6)
  np.testing.assert_allclose(ds.x[1], 1.0, atol=1e-6)
  np.testing.assert_allclose(ds.x[2, :, :16], 1.0, atol=1e-6)
  np.testing.assert_allclose(ds.x[2, :, 16:], 0.0, atol=1e-6)
  np.testing.assert_array_equal(ds.client_id, [10, 11, 12])
  np.testing.assert_array_equal(ds.meta['alphabet_char_id'], [0, 1, 2])
  np.testing.assert_array_equal(no_clients.client_id, -1)


def test_area_resize_matrix():
  w = tfds_loaders.area_resize_matrix(105, 28)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
  # Output pixel 0 covers source [0, 3.75): 1, 1, 1, 0.75 over 3.75.
  np.testing.assert_allclose(w[0, :4], np.array([1, 1, 1, .75]) / 3.75)
  assert not w[0, 4:].any()
  # An integer factor is a block mean.
  np.testing.assert_allclose(tfds_loaders.area_resize_matrix(4, 2),
                             [[.5, .5, 0, 0], [0, 0, .5, .5]])


def test_pad_or_trim():
  np.testing.assert_array_equal(
      tfds_loaders.pad_or_trim(np.array([1, 2, 3]), 5), [1, 2, 3, 0, 0])
  np.testing.assert_array_equal(
      tfds_loaders.pad_or_trim(np.arange(8), 5), np.arange(5))


@_needs_tf
def test_speech_commands_random_mock():
  with _mock(5):
    raw = list(tfds.as_numpy(tfds.load('speech_commands', split='train')))
    ds = tfds_loaders.load_tfds('speech_commands', 'train', chunk_size=2)
  assert len(ds) == 5
  assert ds.x.shape == (5, 98, 40) and ds.x.dtype == np.float32
  assert np.isfinite(ds.x).all()
  assert ds.y.dtype == np.int32 and ds.num_classes == 12
  assert 0 <= ds.y.min() and ds.y.max() < 12
  np.testing.assert_array_equal(ds.client_id, -1)
  # The mock is deterministic, so the raw clips are the ones converted.
  np.testing.assert_array_equal(ds.y, [ex['label'] for ex in raw])
  clip = tfds_loaders.pad_or_trim(raw[0]['audio']).astype(np.float32) / 32768
  np.testing.assert_allclose(ds.x[0], np.asarray(audio.log_mel(clip)),
                             rtol=1e-4, atol=1e-4)


@_needs_tf
def test_speech_commands_pads_and_trims_to_one_second():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  long_clip = rng.integers(-2**15, 2**15, 20000).astype(np.int16)
  short_clip = rng.integers(-2**15, 2**15, 100).astype(np.int16)

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    return tf.data.Dataset.from_generator(
        lambda: iter([{'audio': long_clip, 'label': 1},
                      {'audio': short_clip, 'label': 11}]),
        output_signature={'audio': tf.TensorSpec([None], tf.int16),
                          'label': tf.TensorSpec([], tf.int64)})

  with _mock(as_dataset_fn=as_dataset):
    ds = tfds_loaders.load_tfds('speech_commands')
  expected = np.stack([long_clip[:16000],
                       np.pad(short_clip, (0, 15900))]).astype(np.float32)
  np.testing.assert_allclose(ds.x, np.asarray(audio.log_mel(expected / 32768)),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(ds.y, [1, 11])


def test_argument_errors():
  with pytest.raises(ValueError, match='choose one of'):
    tfds_loaders.load_tfds('cifar10')
  with pytest.raises(ValueError, match='Unknown EMNIST config'):
    tfds_loaders.load_tfds('emnist', config='bogus')
  with pytest.raises(ValueError, match='has no builder configs'):
    tfds_loaders.load_tfds('fashion_mnist', config='balanced')
  with pytest.raises(ValueError, match='give it once'):
    tfds_loaders.load_tfds('emnist/byclass', config='balanced')
  with pytest.raises(ValueError, match='backend must be one of'):
    tfds_loaders.load_tfds('fashion_mnist', backend='torch')
  with pytest.raises(ValueError, match="use backend='tf'"):
    tfds_loaders.load_tfds('speech_commands', backend='data_source')
  with pytest.raises(ValueError, match='chunk_size'):
    tfds_loaders.load_tfds('fashion_mnist', chunk_size=0)


def test_missing_tensorflow_is_explained(monkeypatch):
  # Only the availability probe is faked: the real check that follows it runs.
  monkeypatch.setattr(tfds_loaders, '_tensorflow_available', lambda: False)
  with pytest.raises(ImportError, match='pip install tensorflow-cpu'):
    tfds_loaders.load_tfds('speech_commands')
  with pytest.raises(ImportError, match="backend='data_source'"):
    tfds_loaders.load_tfds('fashion_mnist', backend='tf')


def _data_config(**fields):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(fields)


@pytest.mark.parametrize('name,num_classes', [
    ('tfds_emnist', 47), ('tfds_fashion_mnist', 10)])
def test_registry_selects_tfds_images_by_name(name, num_classes):
  from ondevice.data import registry  # pylint: disable=g-import-not-at-top
  with _mock(9):
    train, test = registry.load_dataset(_data_config(
        name=name, backend='data_source', max_train=6, max_test=0))
  assert train.x.shape == (6, 28, 28, 1) and len(test) == 9
  assert train.num_classes == num_classes
  # Standardised with the train split's statistics (one scalar for images).
  assert abs(float(train.x.mean())) < 1e-5
  assert float(train.x.std()) == pytest.approx(1.0, rel=1e-3)
  assert np.shape(train.info['feature_mean']) == ()


@_needs_tf
def test_registry_selects_tfds_speech_commands():
  from ondevice.data import registry  # pylint: disable=g-import-not-at-top
  with _mock(4):
    train, test = registry.load_dataset(_data_config(
        name='tfds_speech_commands', test_split='validation'))
  assert train.x.shape == (4, 98, 40) and len(test) == 4
  # Per mel band, as the offline speech corpus.
  assert train.info['feature_mean'].shape == (40,)
  np.testing.assert_allclose(train.x.mean(axis=(0, 1)), 0.0, atol=1e-4)


@pytest.mark.parametrize('fields,match', [
    (dict(name='tfds_cifar10'),
     r"config.data.name='tfds_cifar10' is unknown; choose one of .*"
     r"'speech_keywords', 'fashion_mnist', 'tfds_speech_commands', "
     r"'tfds_emnist', 'tfds_fashion_mnist'"),
    (dict(name='tfds_emnist', config='bogus'),
     r'config.data.config: Unknown EMNIST config'),
    (dict(name='tfds_fashion_mnist', backend='torch'),
     r'config.data.backend: backend must be one of'),
    (dict(name='tfds_speech_commands', backend='data_source'),
     r"config.data.backend: .*use backend='tf'"),
    (dict(name='tfds_emnist', num_speakerz=3),
     r"config.data has unknown fields \['num_speakerz'\]"),
    (dict(name='tfds_emnist', max_train=-1), r'config.data.max_train'),
])
def test_registry_rejects_bad_tfds_configs_before_loading(fields, match,
                                                          monkeypatch):
  from ondevice.data import registry  # pylint: disable=g-import-not-at-top

  def no_loading(*args, **kwargs):
    raise AssertionError('data loading started before validation')
  monkeypatch.setattr(tfds_loaders, 'load_tfds', no_loading)
  with pytest.raises(ValueError, match=match):
    registry.validate_data_config(_data_config(**fields))
  with pytest.raises(ValueError, match=match):
    registry.load_dataset(_data_config(**fields))
