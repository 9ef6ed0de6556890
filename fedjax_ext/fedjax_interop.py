"""A `fedjax.FederatedData` as the client source of our rounds.

FedJAX (Ro et al. 2021, "FedJAX: Federated learning simulation with JAX")
keeps clients as `ClientDataset`s of feature dicts behind a `FederatedData`
(in memory, SQLite, or its EMNIST / Shakespeare / Stack Overflow loaders).
Our rounds take a stacked, padded cohort instead (see `cohort.py`). This
module converts one into the other, so any FedJAX dataset feeds
`jit(vmap(client_update))`:

    fedjax = fedjax_interop.import_fedjax()     # installs the JAX shim
    source = fedjax_interop.FederatedDataSource(fd)
    ids = source.sample(key, cohort_size=100)   # pool indices
    cohort = source.cohort(ids, max_examples=20, key=key)
    state, metrics = algorithm.apply(state, cohort, ids, key)

or, for a dataset that fits in memory, `to_array_dataset(fd)` builds one
`ArrayDataset` whose `client_id` column is the pool index, for the rest of
the codebase (`ClientPool.from_dataset`, `experiments/federated.py`).

A haiku `fedjax.Model` can be passed to any algorithm where a loss function
goes (through `as_loss_fn`); the algorithm's params are then
`model.init(key)` and come back nested at every '/' (`to_haiku_params`
restores the haiku layout):

    source = fedjax_interop.FederatedDataSource(fd)
    fedjax_interop.check_model_outputs(model, params, source)  # label range
    algorithm = fedjax_ext.fedavg(model, optax.sgd(0.1),
                                  LocalConfig(batch_size=5, num_steps=4,
                                              last_batch='fill'))
    state = algorithm.init(params)
    ids = source.sample(key, cohort_size=50)
    state, metrics = algorithm.apply(state, source.cohort(ids, 32, key), ids,
                                     key)
    fedjax_params = fedjax_interop.to_haiku_params(state.params)

(`last_batch='fill'` fills short batches as FedJAX does.) A stax model, or one whose
params should keep FedJAX's names, trains through `bridge_fedjax_model`, which renames its params into the '/'-path dicts that
`ondevice.train` splits and merges, and wraps its per-example `train_loss`
as our masked `LossFn`:

    bridge = fedjax_interop.bridge_fedjax_model(model, model.init(key))
    algorithm = fedavg(bridge.loss_fn, optax.sgd(0.1), local)
    state = algorithm.init(bridge.params)
    fedjax_params = bridge.to_fedjax(state.params)

Pool indices are positions in `FederatedDataSource.client_ids`: the FedJAX
client ids in `fd.client_sizes()` order (sorted for FedJAX's own classes),
without clients that have no examples (counted in `num_empty`, as in
`ClientPool`). Examples are read through `ClientDataset.all_examples()`, so
FedJAX's client and batch preprocessors are applied. Only `import_fedjax`
imports fedjax: a source is any object with `client_sizes()` and
`get_client(id)`, and a model any object with `apply_for_train` and
`train_loss`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_ext import cohort as cohort_lib
from ondevice import train
from ondevice.data.base import ArrayDataset

PyTree = Any


def import_fedjax():
  """Installs the JAX compatibility shim, then imports and returns fedjax.

  Raises:
    ImportError: with the install command when fedjax is missing.
  """
  from third_party import fedjax_compat  # pylint: disable=g-import-not-at-top
  fedjax_compat.install()
  try:
    import fedjax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("fedjax is not installed; run pip install -e "
                      "'.[fedjax]'.") from e
  return fedjax


def _client_arrays(examples: Mapping[str, Any], x_key: str, y_key: str,
                   x_dtype, client_id: Any) -> dict[str, np.ndarray]:
  """One FedJAX client's examples as {'x': [n, ...], 'y': int32 [n]}."""
  missing = {x_key, y_key} - set(examples)
  if missing:
    raise ValueError(
        f'FedJAX client {client_id!r} has features {sorted(examples)} but '
        f'not {sorted(missing)}; pass x_key= / y_key= naming the input and '
        'the label features.')
  x = np.asarray(examples[x_key])
  y = np.asarray(examples[y_key])
  if y.ndim != 1 or len(y) != len(x):
    raise ValueError(
        f'FedJAX client {client_id!r}: labels {y_key!r} have shape {y.shape} '
        f'for {len(x)} inputs; cohorts need one integer label per example '
        '(sequence labels, e.g. Shakespeare, are not supported).')
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'FedJAX client {client_id!r}: labels {y_key!r} have '
                     f'dtype {y.dtype}; expected integers.')
  return {'x': x.astype(x_dtype, copy=False), 'y': y.astype(np.int32)}


class FederatedDataSource:
  """Samples cohorts of a `fedjax.FederatedData` for our rounds.

  Attributes:
    federated_data: the wrapped FederatedData.
    client_ids: the FedJAX ids of the pool clients; pool index i is
      `client_ids[i]`.
    sizes: int32 [P] examples of each pool client (all >= 1).
    num_empty: FedJAX clients without examples (never sampled).
  """

  def __init__(self, federated_data, x_key: str = 'x', y_key: str = 'y',
               x_dtype=np.float32):
    """Reads the client sizes (not the examples) of `federated_data`.

    Args:
      federated_data: a `fedjax.FederatedData` (or any object with
        `client_sizes()` and `get_client(client_id)`).
      x_key: the feature holding each example's input.
      y_key: the feature holding each example's integer label.
      x_dtype: inputs are cast to it (the models here take float32).

    Raises:
      ValueError: when no client has an example.
    """
    self.federated_data = federated_data
    self._x_key, self._y_key, self._x_dtype = x_key, y_key, x_dtype
    ids, sizes = [], []
    num_empty = 0
    for client_id, size in federated_data.client_sizes():
      if size > 0:
        ids.append(client_id)
        sizes.append(size)
      else:
        num_empty += 1
    if not ids:
      raise ValueError('The FederatedData has no client with examples.')
    if num_empty:
      logging.warning('FederatedData: %d of %d clients have no examples; '
                      'they are skipped (never sampled).', num_empty,
                      num_empty + len(ids))
    self.client_ids = tuple(ids)
    self.sizes = np.asarray(sizes, np.int32)
    self.num_empty = num_empty

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  def client_examples(self, pool_index: int) -> dict[str, np.ndarray]:
    """{'x': [n, ...], 'y': int32 [n]} of one pool client, preprocessed."""
    if not 0 <= pool_index < self.num_clients:
      raise ValueError(f'Client {pool_index} is outside the pool [0, '
                       f'{self.num_clients}).')
    client_id = self.client_ids[pool_index]
    examples = self.federated_data.get_client(client_id).all_examples()
    return _client_arrays(examples, self._x_key, self._y_key, self._x_dtype,
                          client_id)

  def sample(self, key: jax.Array, cohort_size: int,
             weighted: bool = False) -> jax.Array:
    """Pool indices of a cohort (see `cohort.sample_clients`)."""
    return cohort_lib.sample_clients(key, self.sizes, cohort_size, weighted)

  def cohort(self, pool_indices: Sequence[int] | jax.Array, max_examples: int,
             key: jax.Array) -> cohort_lib.Cohort:
    """Stacks the given pool clients into a padded cohort.

    Args:
      pool_indices: distinct pool indices, e.g. from `sample`.
      max_examples: M; clients with more examples are subsampled with `key`.
      key: PRNG key of that subsampling.

    Returns:
      {'x': [C, M, ...], 'y': [C, M], 'mask': [C, M]} (see
      `cohort.stack_clients`); a client's examples keep FedJAX's order.
    """
    indices = np.asarray(pool_indices).reshape(-1)
    if len(np.unique(indices)) != len(indices):
      raise ValueError(f'pool_indices repeat a client: {indices.tolist()}; '
                       'sample without replacement.')
    clients = [self.client_examples(int(i)) for i in indices]
    return cohort_lib.stack_clients(clients, max_examples, key)

  def to_array_dataset(self, num_classes: int | None = None,
                       class_names: Sequence[str] | None = None
                       ) -> ArrayDataset:
    """All pool clients in one ArrayDataset; `client_id` is the pool index.

    Args:
      num_classes: number of labels (default: the largest label + 1).
      class_names: names of the labels (default: '0', '1', ...).

    Returns:
      An ArrayDataset with `info['fedjax_client_ids']` holding the FedJAX id
      of each pool index.
    """
    clients = [self.client_examples(i) for i in range(self.num_clients)]
    x = np.concatenate([c['x'] for c in clients])
    y = np.concatenate([c['y'] for c in clients])
    client_id = np.repeat(np.arange(self.num_clients, dtype=np.int32),
                          self.sizes)
    if class_names is None:
      num_classes = num_classes or int(y.max()) + 1
      class_names = tuple(str(i) for i in range(num_classes))
    return ArrayDataset(x=x, y=y, client_id=client_id,
                        class_names=tuple(class_names),
                        info={'source': 'fedjax',
                              'fedjax_client_ids': self.client_ids})


def to_array_dataset(federated_data, x_key: str = 'x', y_key: str = 'y',
                     num_classes: int | None = None,
                     class_names: Sequence[str] | None = None
                     ) -> ArrayDataset:
  """`FederatedDataSource(federated_data, ...).to_array_dataset(...)`."""
  return FederatedDataSource(federated_data, x_key, y_key).to_array_dataset(
      num_classes, class_names)


def _segment(key: Any) -> str:
  """One step of a key path as a name without '/' (haiku uses '/')."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr)).replace('/', ':')
  return str(key).replace('/', ':')


class FedjaxModelBridge(NamedTuple):
  """A fedjax.Model seen as our params and `LossFn`.

  Attributes:
    params: the model's params as nested dicts whose '/'-joined paths are
      the FedJAX key paths ('/' inside a haiku module name becomes ':', e.g.
      'mlp:~:linear_0/w'); trainable rules match these paths.
    loss_fn: `(params, model_state, batch, rng) -> (loss, (sums, state))`:
      the masked mean of the model's per-example `train_loss`, with sums
      'loss_sum', 'correct' (argmax of [B, K] predictions) and 'count'.
    to_fedjax: our params -> the FedJAX params tree (same leaves).
  """
  params: PyTree
  loss_fn: train.LossFn
  to_fedjax: Callable[[PyTree], PyTree]


def bridge_fedjax_model(model, fedjax_params: PyTree, x_key: str = 'x',
                        y_key: str = 'y') -> FedjaxModelBridge:
  """Lets a `fedjax.Model` train in our rounds on the same parameters.

  Args:
    model: a fedjax.Model (`apply_for_train(params, batch, rng)` and
      `train_loss(batch, preds) -> [B]`), e.g. from
      `fedjax.create_model_from_haiku` or `create_model_from_stax`.
    fedjax_params: its params, e.g. `model.init(key)`; only the tree layout
      is kept.
    x_key: the batch feature the FedJAX model reads its input from.
    y_key: the batch feature its `train_loss` reads labels from.

  Returns:
    A FedjaxModelBridge; `bridge.params` holds the values of
    `fedjax_params`.
  """
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(fedjax_params)
  names = ['/'.join(_segment(k) for k in path) for path, _ in with_paths]
  if len(set(names)) != len(names):
    raise ValueError(f'FedJAX params give repeated paths {names}; rename '
                     'the modules.')

  def to_ours(tree):
    leaves = treedef.flatten_up_to(tree)
    return train.unflatten_params(dict(zip(names, leaves)))

  def to_fedjax(params):
    flat = train.flatten_params(params)
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])

  return FedjaxModelBridge(
      params=to_ours(fedjax_params),
      loss_fn=_masked_loss(model, to_fedjax, x_key, y_key),
      to_fedjax=to_fedjax)


def _check_predictions(preds: jax.Array, labels: jax.Array) -> None:
  """Trace-time shape check of a FedJAX model's predictions."""
  if preds.ndim < 1 or preds.shape[0] != labels.shape[0]:
    raise ValueError(
        f'The FedJAX model predicts shape {preds.shape} for a batch of '
        f'{labels.shape[0]} labels; its apply_for_train must return one row '
        'per example ([B, num_classes]).')


def _masked_loss(model, to_fedjax: Callable[[PyTree], PyTree], x_key: str,
                 y_key: str) -> train.LossFn:
  """Our masked `LossFn` from a FedJAX model's per-example `train_loss`."""
  def loss_fn(params, model_state, batch, rng):
    fedjax_batch = {x_key: batch['x'], y_key: batch['y']}
    preds = model.apply_for_train(to_fedjax(params), fedjax_batch, rng)
    _check_predictions(preds, batch['y'])
    per_example = model.train_loss(fedjax_batch, preds)
    mask = batch['mask'].astype(jnp.float32)
    if preds.ndim == 2:
      correct = (jnp.argmax(preds, -1) == batch['y']).astype(jnp.float32)
    else:
      correct = jnp.zeros_like(mask)
    sums = {'loss_sum': jnp.sum(per_example * mask),
            'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask)}
    return train.masked_mean(per_example, mask), (sums, model_state)

  return loss_fn


def is_fedjax_model(obj: Any) -> bool:
  """Whether `obj` looks like a `fedjax.Model` (duck-typed, no import)."""
  return hasattr(obj, 'apply_for_train') and hasattr(obj, 'train_loss')


def to_haiku_params(params: PyTree) -> dict[str, dict[str, jax.Array]]:
  """Params in haiku's {module: {name: value}} layout.

  Our rounds nest params at every '/' of a path, so haiku's
  {'mlp/~/linear_0': {'w': w}} comes back as {'mlp': {'~': {'linear_0':
  {'w': w}}}}; the last path segment is the param name, the rest the module.

  Raises:
    ValueError: for params that are not nested dicts (stax tuples): those
      need `bridge_fedjax_model`.
  """
  if not isinstance(params, Mapping):
    raise ValueError(
        f'A fedjax.Model passed as a loss needs haiku params (nested dicts); '
        f'got {type(params).__name__}. For stax models use '
        'bridge_fedjax_model(model, params) and pass bridge.loss_fn and '
        'bridge.params.')
  out = {}
  for path, value in train.flatten_params(params).items():
    if '/' not in path:
      raise ValueError(f'Param {path!r} has no module; haiku params are '
                       '{module: {name: value}}.')
    module, name = path.rsplit('/', 1)
    out.setdefault(module, {})[name] = value
  return out


def fedjax_model_loss(model, x_key: str = 'x', y_key: str = 'y'
                      ) -> train.LossFn:
  """A haiku `fedjax.Model` as our `LossFn` over its own params.

  The masked mean of the model's per-example `train_loss`, with sums
  'loss_sum', 'correct' (argmax of [B, K] predictions) and 'count'. Params
  may be haiku's layout or ours (`to_haiku_params`).
  """
  return _masked_loss(model, to_haiku_params, x_key, y_key)


def as_loss_fn(loss_or_model: Any) -> train.LossFn:
  """A loss function as is, or a `fedjax.Model` through `fedjax_model_loss`.

  Raises:
    TypeError: for anything else.
  """
  if is_fedjax_model(loss_or_model):
    return fedjax_model_loss(loss_or_model)
  if not callable(loss_or_model):
    raise TypeError(
        f'Expected a loss function (params, model_state, batch, rng) -> '
        f'(loss, (sums, model_state)) or a fedjax.Model; got '
        f'{type(loss_or_model).__name__}. For a flax module use '
        'ondevice.train.classification_loss(model).')
  return loss_or_model


def check_model_outputs(model, params: PyTree, source: FederatedDataSource,
                        x_key: str = 'x') -> int:
  """Checks a FedJAX model's output size against a source's labels.

  Runs `model.apply_for_eval` on the first pool client and compares the
  number of predicted classes with the largest label of the pool (labels
  are read from every client once).

  Returns:
    The number of classes the model predicts.

  Raises:
    ValueError: when a label is outside the model's outputs.
  """
  first = source.client_examples(0)
  preds = model.apply_for_eval(to_haiku_params(params)
                               if isinstance(params, Mapping) else params,
                               {x_key: first['x'][:1]})
  num_classes = int(np.shape(preds)[-1])
  largest = max(int(source.client_examples(i)['y'].max())
                for i in range(source.num_clients))
  if largest >= num_classes:
    raise ValueError(
        f'The FedJAX model predicts {num_classes} classes but the data has '
        f'label {largest}; build the model with at least {largest + 1} '
        'outputs (e.g. the last hk.Linear), or remap the labels.')
  return num_classes
