"""A client population kept compactly on disk and read per cohort.

Populations of tens of thousands of simulated devices do not fit in host
memory as float32 log-mel features, and a federated round needs only its
cohort. A `ClientStore` keeps every client's examples on disk, quantised to
int16 or uint8 with a per-feature scale and offset (the last feature axis,
e.g. the mel bin), in NumPy `.npy` files that are memory-mapped
(`np.lib.format.open_memmap`), so a cohort reads only its clients' rows.

Layout of a store directory:

    manifest.json                 format, shapes, dtypes, quantiser, shards
    shard_00000/x.npy             int [n, ...] quantised features
    shard_00000/y.npy             int32 [n] labels
    shard_00000/offsets.npy       int64 [k + 1]; client j of the shard owns
                                  rows offsets[j]:offsets[j + 1]
    shard_00000/dataset_ids.npy   int32 [k] the caller's id of each client

Shards are written one at a time into a temporary directory, fsynced, and
renamed into place; only then is the shard (with the SHA-256 of each file)
added to the manifest, itself replaced atomically. A build interrupted at
any point therefore leaves whole shards that `build_store` keeps and resumes
after; `open_store` refuses an incomplete or damaged store with a message
saying how to resume.

Clients are addressed by dense *pool indices* in [0, num_clients) in shard
order, as in `fedjax_ext.cohort.ClientPool`; clients given without examples
are skipped and counted (`num_empty`), never sampled. `ClientStore.gather`
returns exactly what `fedjax_ext.cohort.gather_cohort` returns for the same
(dequantised) clients, padding, mask and subsampling included.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

FORMAT = 'ondevice.client_store/1'
MANIFEST = 'manifest.json'
ARRAYS = ('x', 'y', 'offsets', 'dataset_ids')
QUANT_DTYPES = ('int16', 'uint8')


class StoreError(ValueError):
  """A store that is missing, incomplete or damaged."""


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """Affine per-feature quantisation: x ~= q * scale + offset.

  Attributes:
    dtype: 'int16' or 'uint8'.
    scale: float32 [F] step of each feature (last axis).
    offset: float32 [F] value of q = 0 of each feature.
  """
  dtype: str
  scale: np.ndarray
  offset: np.ndarray

  @classmethod
  def from_range(cls, low, high, dtype: str = 'int16') -> 'Quantizer':
    """Maps [low, high] of each feature onto the whole integer range."""
    if dtype not in QUANT_DTYPES:
      raise ValueError(f'Quantizer dtype must be one of {QUANT_DTYPES}; got '
                       f'{dtype!r}.')
    low = np.asarray(low, np.float32).reshape(-1)
    high = np.asarray(high, np.float32).reshape(-1)
    if low.shape != high.shape or np.any(high <= low):
      raise ValueError('Quantizer.from_range needs low < high for every '
                       f'feature; got low {low} and high {high}.')
    info = np.iinfo(dtype)
    scale = (high - low) / np.float32(info.max - info.min)
    offset = low - np.float32(info.min) * scale
    return cls(dtype, scale.astype(np.float32), offset.astype(np.float32))

  def quantize(self, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Returns (q, number of values clipped to the integer range)."""
    info = np.iinfo(self.dtype)
    q = np.rint((np.asarray(x, np.float32) - self.offset) / self.scale)
    clipped = int(np.sum((q < info.min) | (q > info.max)))
    return np.clip(q, info.min, info.max).astype(self.dtype), clipped

  def dequantize(self, q: np.ndarray) -> np.ndarray:
    """float32 features of quantised rows."""
    return q.astype(np.float32) * self.scale + self.offset

  def to_json(self) -> dict[str, Any]:
    return {'dtype': self.dtype, 'scale': self.scale.tolist(),
            'offset': self.offset.tolist()}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'Quantizer':
    return cls(d['dtype'], np.asarray(d['scale'], np.float32),
               np.asarray(d['offset'], np.float32))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _shard_dir(root: str, index: int) -> str:
  return os.path.join(root, f'shard_{index:05d}')


def _write_json_atomic(path: str, data: Mapping[str, Any]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_manifest(root: str) -> dict[str, Any]:
  path = os.path.join(root, MANIFEST)
  if not os.path.exists(path):
    raise StoreError(f'No client store at {root!r} (no {MANIFEST}); build '
                     'one with ondevice.data.client_store.build_store.')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise StoreError(f'{path} is not valid JSON ({e}); the store is damaged: '
                     'delete the directory and rebuild it.') from e
  if manifest.get('format') != FORMAT:
    raise StoreError(f'{path} has format {manifest.get("format")!r}; '
                     f'expected {FORMAT!r}.')
  return manifest


def _shard_arrays(clients: Sequence[Mapping[str, Any]], quantizer: Quantizer,
                  feature_shape: tuple[int, ...]):
  """Checks one shard's clients; returns (sizes, ids, skipped empty)."""
  sizes, ids, empty = [], [], 0
  for j, client in enumerate(clients):
    x, y = np.asarray(client['x']), np.asarray(client['y'])
    if x.shape[1:] != feature_shape or y.shape != x.shape[:1]:
      raise ValueError(
          f'Client {j} of the shard has x {x.shape} and y {y.shape}; the '
          f'store holds x [n, {", ".join(map(str, feature_shape))}] and '
          'y [n].')
    if not len(x):
      empty += 1
      continue
    sizes.append(len(x))
    ids.append(int(client['id']))
  if feature_shape[-1] != quantizer.scale.shape[0]:
    raise ValueError(f'The quantizer has {quantizer.scale.shape[0]} '
                     f'features; the last feature axis has {feature_shape[-1]}.')
  return np.asarray(sizes, np.int64), np.asarray(ids, np.int32), empty


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_shard(root: str, index: int,
                 clients: Sequence[Mapping[str, Any]], quantizer: Quantizer,
                 feature_shape: tuple[int, ...]) -> dict[str, Any]:
  """Writes one shard into a temporary directory, then renames it in place.

  Returns its manifest entry (counts and the SHA-256 of every file).
  """
  sizes, ids, empty = _shard_arrays(clients, quantizer, feature_shape)
  final, tmp = _shard_dir(root, index), _shard_dir(root, index) + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  x = np.lib.format.open_memmap(os.path.join(tmp, 'x.npy'), mode='w+',
                                dtype=quantizer.dtype,
                                shape=(int(offsets[-1]),) + feature_shape)
  y = np.empty(int(offsets[-1]), np.int32)
  clipped, row = 0, 0
  for client in clients:
    n = len(client['x'])
    if n:
      x[row:row + n], c = quantizer.quantize(client['x'])
      y[row:row + n] = client['y']
      clipped, row = clipped + c, row + n
  x.flush()
  del x
  np.save(os.path.join(tmp, 'y.npy'), y)
  np.save(os.path.join(tmp, 'offsets.npy'), offsets)
  np.save(os.path.join(tmp, 'dataset_ids.npy'), ids)
  entry = {'num_clients': len(sizes), 'num_examples': int(offsets[-1]),
           'num_empty': empty, 'num_clipped': clipped, 'files': {}}
  for name in ARRAYS:
    path = os.path.join(tmp, f'{name}.npy')
    with open(path, 'rb') as f:
      os.fsync(f.fileno())
    entry['files'][name] = {'sha256': _sha256(path),
                            'bytes': os.path.getsize(path)}
  _fsync_dir(tmp)
  shutil.rmtree(final, ignore_errors=True)  # A shard renamed in but unlisted.
  os.rename(tmp, final)
  _fsync_dir(root)
  return entry


def _check_shard_files(root: str, index: int, entry: Mapping[str, Any],
                       checksums: bool) -> str | None:
  """Why shard `index` is damaged, or None if its files match the entry."""
  for name, expected in entry['files'].items():
    path = os.path.join(_shard_dir(root, index), f'{name}.npy')
    if not os.path.exists(path):
      return f'{path} is missing'
    if os.path.getsize(path) != expected['bytes']:
      return (f'{path} has {os.path.getsize(path)} bytes; the manifest '
              f'says {expected["bytes"]}')
    if checksums and _sha256(path) != expected['sha256']:
      return f'{path} does not match its SHA-256 in the manifest'
  return None


def _new_manifest(num_shards: int, feature_shape, class_names, quantizer,
                  info) -> dict[str, Any]:
  return {'format': FORMAT, 'num_shards': int(num_shards),
          'feature_shape': list(feature_shape),
          'class_names': list(class_names), 'quantizer': quantizer.to_json(),
          'info': dict(info or {}), 'shards': {}, 'complete': False}


def _same_build(manifest: Mapping[str, Any], wanted: Mapping[str, Any],
                root: str) -> None:
  """Refuses to resume a store that was started with other arguments."""
  for key in ('num_shards', 'feature_shape', 'class_names', 'quantizer',
              'info'):
    if manifest[key] != json.loads(json.dumps(wanted[key])):
      raise StoreError(
          f'The store at {root!r} was started with a different {key} '
          f'({manifest[key]!r} != {wanted[key]!r}); resume it with the same '
          'arguments, or build into a new directory.')


def _existing_shards(root: str, manifest: dict[str, Any],
                     rebuild_damaged: bool) -> None:
  """Checks the shards already written; sets damaged ones aside or raises."""
  for name, entry in list(manifest['shards'].items()):
    problem = _check_shard_files(root, int(name), entry, checksums=True)
    if problem is None:
      continue
    if not rebuild_damaged:
      raise StoreError(
          f'Shard {name} of the store at {root!r} is damaged: {problem}. '
          'Pass rebuild_damaged=True to set it aside (renamed *.damaged) '
          'and write it again; the other shards are kept.')
    logging.warning('Shard %s is damaged (%s); rewriting it.', name, problem)
    damaged = _shard_dir(root, int(name))
    if os.path.exists(damaged):
      os.replace(damaged, damaged + '.damaged')
    del manifest['shards'][name]


def build_store(root: str, num_shards: int,
                make_shard: Callable[[int], Sequence[Mapping[str, Any]]], *,
                feature_shape: Sequence[int], class_names: Sequence[str],
                quantizer: Quantizer, info: Mapping[str, Any] | None = None,
                rebuild_damaged: bool = False) -> 'ClientStore':
  """Writes (or resumes writing) a store, one shard at a time.

  Args:
    root: the store's directory (created if missing).
    num_shards: how many shards the population is split into.
    make_shard: `make_shard(i)` returns shard i's clients, each a dict with
      'x' float [n, *feature_shape], 'y' int [n] and 'id' (the caller's
      client id); it is only called for shards not yet written, and must
      return the same clients whenever it is called for the same i.
    feature_shape: shape of one example's features.
    class_names: name of each label.
    quantizer: how features are stored (see `Quantizer.from_range`).
    info: JSON-able description of the population (generation parameters);
      part of what a resumed build must match.
    rebuild_damaged: set damaged shards aside and rewrite them, instead of
      refusing to resume.

  Returns:
    The opened, complete store.
  """
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1; got {num_shards}.')
  os.makedirs(root, exist_ok=True)
  feature_shape = tuple(int(d) for d in feature_shape)
  wanted = _new_manifest(num_shards, feature_shape, class_names, quantizer,
                         info)
  path = os.path.join(root, MANIFEST)
  manifest = _read_manifest(root) if os.path.exists(path) else wanted
  _same_build(manifest, wanted, root)
  _existing_shards(root, manifest, rebuild_damaged)
  for name in os.listdir(root):  # Shards a crash left half written.
    if name.startswith('shard_') and name.endswith('.tmp'):
      shutil.rmtree(os.path.join(root, name))
  todo = [i for i in range(num_shards) if str(i) not in manifest['shards']]
  if len(todo) < num_shards:
    logging.info('Resuming the store at %s: %d of %d shards already written.',
                 root, num_shards - len(todo), num_shards)
  for done, index in enumerate(todo, 1):
    manifest['shards'][str(index)] = _write_shard(
        root, index, make_shard(index), quantizer, feature_shape)
    _write_json_atomic(path, manifest)
    logging.log_every_n_seconds(logging.INFO, 'Store %s: shard %d/%d written.',
                                10, root, done, len(todo))
  manifest['complete'] = True
  _write_json_atomic(path, manifest)
  return open_store(root)


def open_store(root: str, verify: bool = False) -> 'ClientStore':
  """Opens a complete store; `verify` also checks every file's SHA-256."""
  manifest = _read_manifest(root)
  written = len(manifest['shards'])
  if not manifest['complete'] or written != manifest['num_shards']:
    raise StoreError(
        f'The store at {root!r} is incomplete: {written} of '
        f'{manifest["num_shards"]} shards written (an interrupted build). '
        'Call build_store with the same arguments to resume it.')
  for name, entry in manifest['shards'].items():
    problem = _check_shard_files(root, int(name), entry, checksums=verify)
    if problem is not None:
      raise StoreError(f'Shard {name} of the store at {root!r} is damaged: '
                       f'{problem}. Rebuild it with build_store(..., '
                       'rebuild_damaged=True).')
  return ClientStore(root, manifest)


def _subsample_seeds(key: jax.Array, positions: np.ndarray) -> np.ndarray:
  """[len(positions), k] key data of `fold_in(key, j)` for each position j.

  One vectorised call instead of one `fold_in` per client: per-call dispatch
  would otherwise dominate the gather of a small cohort.
  """
  if not len(positions):
    return np.zeros((0, 0), np.uint32)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(
      key, np.asarray(positions, np.uint32))
  data = np.asarray(jax.random.key_data(keys))
  return data.reshape(len(positions), -1)


def _pick_rows(n: int, max_examples: int, seed: np.ndarray | None
               ) -> np.ndarray:
  """Rows kept of a client with n examples.

  The same draw as `fedjax_ext.cohort.stack_clients`: all rows if n <= M,
  else M rows without replacement from a NumPy generator seeded by the key
  data of `fold_in(key, j)` (j: the client's cohort position), sorted.
  """
  if n <= max_examples:
    return np.arange(n)
  rng = np.random.default_rng([int(v) for v in seed])
  return np.sort(rng.choice(n, max_examples, replace=False))


class ClientStore:
  """A complete store, opened read-only; shards are mapped on first use.

  Attributes:
    root: the store's directory.
    quantizer: how features were stored.
    feature_shape: shape of one example's features.
    class_names: name of each label.
    num_clients: P, clients with at least one example.
    num_empty: clients given without examples (skipped).
    sizes: int32 [P] examples of each pool client (for client sampling).
  """

  def __init__(self, root: str, manifest: Mapping[str, Any]):
    self.root = root
    self.manifest = manifest
    self.quantizer = Quantizer.from_json(manifest['quantizer'])
    self.feature_shape = tuple(manifest['feature_shape'])
    self.class_names = tuple(manifest['class_names'])
    shards = [manifest['shards'][str(i)]
              for i in range(manifest['num_shards'])]
    counts = [s['num_clients'] for s in shards]
    # First pool index of each shard: finding a client's shard is a binary
    # search over shards, independent of how many clients there are.
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.num_clients = int(self._starts[-1])
    self.num_examples = int(sum(s['num_examples'] for s in shards))
    self.num_empty = int(sum(s['num_empty'] for s in shards))
    # Row offsets of every shard, read once (a few bytes per client), so
    # finding a client's rows touches no shard file.
    self._offsets = [
        np.load(os.path.join(_shard_dir(root, i), 'offsets.npy'))
        for i in range(manifest['num_shards'])]
    self.sizes = np.concatenate(
        [np.diff(o) for o in self._offsets]).astype(np.int32)
    self._open: dict[int, dict[str, np.ndarray]] = {}

  def _shard(self, index: int) -> dict[str, np.ndarray]:
    """Shard `index`'s features and labels, memory-mapped on first use."""
    if index not in self._open:
      folder = _shard_dir(self.root, index)
      self._open[index] = {
          name: np.load(os.path.join(folder, f'{name}.npy'), mmap_mode='r')
          for name in ('x', 'y')}
    return self._open[index]

  def _locate(self, client: int) -> tuple[dict[str, np.ndarray], int, int]:
    """(shard arrays, first row, end row) of pool client `client`."""
    shard = int(np.searchsorted(self._starts, client, side='right')) - 1
    offsets = self._offsets[shard]
    j = client - int(self._starts[shard])
    return self._shard(shard), int(offsets[j]), int(offsets[j + 1])

  def dataset_ids(self, client_ids) -> np.ndarray:
    """The caller's ids (given at build time) of the given pool clients."""
    out = []
    for c in self._check_ids(client_ids):
      shard = int(np.searchsorted(self._starts, c, side='right')) - 1
      ids = np.load(os.path.join(_shard_dir(self.root, shard),
                                 'dataset_ids.npy'), mmap_mode='r')
      out.append(int(ids[c - int(self._starts[shard])]))
    return np.asarray(out, np.int32)

  def _check_ids(self, client_ids) -> np.ndarray:
    ids = np.asarray(client_ids).reshape(-1).astype(np.int64)
    if len(ids) > self.num_clients:
      raise ValueError(
          f'A cohort of {len(ids)} clients is larger than the population '
          f'of {self.num_clients} clients in {self.root!r}; lower the '
          f'cohort size to at most {self.num_clients}.')
    if len(np.unique(ids)) != len(ids):
      raise ValueError(f'client_ids repeat a client: {ids.tolist()}; '
                       'sample without replacement.')
    if len(ids) and (ids.min() < 0 or ids.max() >= self.num_clients):
      raise ValueError(f'client_ids must lie in [0, {self.num_clients}); got '
                       f'[{ids.min()}, {ids.max()}].')
    return ids

  def sample(self, key: jax.Array, cohort_size: int) -> np.ndarray:
    """Draws `cohort_size` distinct pool clients uniformly (sorted int32).

    Floyd's algorithm (Bentley & Floyd 1987, "Programming pearls: a sample
    of brilliance") on a NumPy generator seeded by `key`: cost and memory
    grow with the cohort only, not with the population. Every fixed-size
    subset is equally likely, as with `fedjax_ext.cohort.sample_clients`
    (uniform, without replacement; all store clients have data), but for a
    given key the two draw different cohorts.

    Raises:
      ValueError: a cohort size below 1 or above the population.
    """
    if not 1 <= cohort_size <= self.num_clients:
      raise ValueError(
          f'A cohort of {cohort_size} clients cannot be drawn from the '
          f'population of {self.num_clients} clients in {self.root!r}; use '
          f'a cohort size in [1, {self.num_clients}].')
    data = np.asarray(jax.random.key_data(key)).ravel()
    rng = np.random.default_rng([int(v) for v in data])
    chosen = set()
    for j in range(self.num_clients - cohort_size, self.num_clients):
      t = int(rng.integers(0, j + 1))
      chosen.add(j if t in chosen else t)
    return np.sort(np.fromiter(chosen, np.int64, cohort_size)).astype(
        np.int32)

  def client(self, client: int) -> dict[str, np.ndarray]:
    """All examples of one pool client, dequantised: {'x', 'y'}."""
    (client,) = self._check_ids([client])
    arrays, start, end = self._locate(int(client))
    return {'x': self.quantizer.dequantize(arrays['x'][start:end]),
            'y': np.asarray(arrays['y'][start:end], np.int32)}

  def gather(self, client_ids, max_examples: int, key: jax.Array,
             positions=None) -> dict[str, np.ndarray]:
    """The padded cohort of the given pool clients, reading only their rows.

    Args:
      client_ids: pool indices (e.g. from `fedjax_ext.cohort.sample_clients`
        with `self.sizes`).
      max_examples: M; clients with more examples keep M of them, drawn with
        `fold_in(key, j)` for the cohort's j-th client.
      key: PRNG key of that subsampling.
      positions: the cohort position j of each given client (default 0, 1,
        ...): a process that gathers only its part of a cohort passes the
        positions of its clients in the whole cohort, so every client is
        subsampled as a one-process gather of the whole cohort would.

    Returns:
      {'x': float32 [C, M, ...], 'y': int32 [C, M], 'mask': float32 [C, M]},
      real examples first in stored order, as `gather_cohort` returns.
    """
    ids = self._check_ids(client_ids)
    if not len(ids):
      raise ValueError('gather got no clients.')
    if max_examples < 1:
      raise ValueError(f'max_examples must be >= 1; got {max_examples}.')
    c = len(ids)
    positions = np.arange(c) if positions is None else np.asarray(positions)
    if positions.shape != (c,):
      raise ValueError(f'positions has shape {positions.shape}; expected '
                       f'({c},), one per client.')
    xs = np.zeros((c, max_examples) + self.feature_shape, np.float32)
    ys = np.zeros((c, max_examples), np.int32)
    mask = np.zeros((c, max_examples), np.float32)
    located = [self._locate(int(client)) for client in ids]
    # Keys for every position (one shape per cohort size: compiled once).
    seeds = _subsample_seeds(key, positions)
    for j, (arrays, start, end) in enumerate(located):
      rows = start + _pick_rows(end - start, max_examples, seeds[j])
      k = len(rows)
      xs[j, :k] = self.quantizer.dequantize(arrays['x'][rows])
      ys[j, :k], mask[j, :k] = arrays['y'][rows], 1.0
    return {'x': xs, 'y': ys, 'mask': mask}

  def first(self, num_clients: int) -> 'ClientStore':
    """A view of pool clients [0, num_clients) of this store.

    It samples, gathers and counts only those clients (e.g. the training
    part of a store whose last clients are held out for evaluation); the
    files are shared, nothing is read.
    """
    if not 1 <= num_clients <= self.num_clients:
      raise ValueError(f'A view of {num_clients} clients of the store at '
                       f'{self.root!r} needs 1 <= num_clients <= '
                       f'{self.num_clients}.')
    view = copy.copy(self)
    view.num_clients = int(num_clients)
    view.sizes = self.sizes[:num_clients]
    view.num_examples = int(np.sum(view.sizes, dtype=np.int64))
    return view

  def to_arrays(self, client_ids=None) -> dict[str, np.ndarray]:
    """Clients in memory (small stores, held-out sets): x, y, client_id.

    client_id is the pool index, so `ClientPool.from_dataset` of an
    ArrayDataset of all clients numbers them as the store does.

    Args:
      client_ids: the pool clients to read (default: all of them); only
        their rows are read.
    """
    xs, ys, cids = [], [], []
    ids = (range(self.num_clients) if client_ids is None
           else self._check_ids(client_ids))
    for c in ids:
      one = self.client(c)
      xs.append(one['x'])
      ys.append(one['y'])
      cids.append(np.full(len(one['y']), c, np.int32))
    return {'x': np.concatenate(xs), 'y': np.concatenate(ys),
            'client_id': np.concatenate(cids)}


def synthetic_store(root: str, num_clients: int, *,
                    feature_shape: Sequence[int] = (98, 40),
                    num_classes: int = 12, examples: tuple[int, int] = (2, 6),
                    clients_per_shard: int = 100, seed: int = 0
                    ) -> ClientStore:
  """A store of random log-mel-shaped clients (scale tests, benchmarks).

  Client i has a number of examples uniform in `examples` (inclusive),
  features uniform in [-10, 5] (log-mel range) stored as int16, and random
  labels; everything is a function of (seed, i), so a resumed build writes
  the same clients.
  """
  feature_shape = tuple(int(d) for d in feature_shape)
  bins = feature_shape[-1]
  quantizer = Quantizer.from_range(np.full(bins, -10.0), np.full(bins, 5.0))

  def make_shard(index):
    clients = []
    for i in range(index * clients_per_shard,
                   min(num_clients, (index + 1) * clients_per_shard)):
      rng = np.random.default_rng([seed, i])
      n = int(rng.integers(examples[0], examples[1] + 1))
      clients.append({
          'x': rng.uniform(-10.0, 5.0, (n,) + feature_shape).astype(
              np.float32),
          'y': rng.integers(0, num_classes, n), 'id': i})
    return clients

  return build_store(
      root, -(-num_clients // clients_per_shard), make_shard,
      feature_shape=feature_shape,
      class_names=tuple(f'class_{k}' for k in range(num_classes)),
      quantizer=quantizer,
      info={'synthetic': True, 'num_clients': num_clients, 'seed': seed,
            'examples': list(examples)})
