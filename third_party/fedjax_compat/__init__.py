"""Restores the JAX APIs fedjax 0.0.17 needs; applied only by `install()`.

fedjax 0.0.17 calls `jax.tree_map` (in `fedjax.core.tree_util`, hence in
every algorithm's aggregation) and, in its pmap `for_each_client` backend,
`jax.device_put_sharded` / `jax.device_put_replicated`. Recent JAX releases
removed all of them (none exists in jax 0.10). `install()` adds them back to
the `jax` module when they are missing. See README.md here for
the licence note.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def device_put_sharded(shards: Sequence[PyTree], devices: Sequence[Any]
                       ) -> PyTree:
  """Stacks `shards` on a new leading axis, shard i on `devices[i]`.

  The behaviour of the removed `jax.device_put_sharded`: every shard has the
  same tree structure and leaf shapes; the result's leaves have shape
  [len(devices), ...] and are split over `devices` along axis 0 (what
  `jax.pmap` takes without a copy).

  Raises:
    ValueError: when the number of shards and devices differ.
  """
  if len(shards) != len(devices):
    raise ValueError(f'device_put_sharded got {len(shards)} shards for '
                     f'{len(devices)} devices; pass one shard per device.')
  mesh = jax.sharding.Mesh(np.asarray(devices), ('devices',))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('devices'))

  def put(*leaves):
    arrays = [jax.device_put(jnp.asarray(leaf)[None], device)
              for leaf, device in zip(leaves, devices)]
    shape = (len(devices),) + arrays[0].shape[1:]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

  return jax.tree_util.tree_map(put, *shards)


def device_put_replicated(x: PyTree, devices: Sequence[Any]) -> PyTree:
  """One copy of `x` per device, stacked on a new leading axis."""
  return device_put_sharded([x] * len(devices), devices)


def _tree_multimap(f: Callable[..., Any], tree: PyTree, *rest: PyTree
                   ) -> PyTree:
  return jax.tree_util.tree_map(f, tree, *rest)


def _restored() -> dict[str, Callable[..., Any]]:
  tu = jax.tree_util
  return {
      'tree_map': tu.tree_map,
      'tree_multimap': _tree_multimap,
      'tree_leaves': tu.tree_leaves,
      'tree_flatten': tu.tree_flatten,
      'tree_unflatten': tu.tree_unflatten,
      'tree_structure': tu.tree_structure,
      'tree_transpose': tu.tree_transpose,
      'device_put_sharded': device_put_sharded,
      'device_put_replicated': device_put_replicated,
  }


def missing() -> list[str]:
  """The names fedjax needs that the installed `jax` lacks."""
  return sorted(name for name in _restored() if not hasattr(jax, name))


def install() -> list[str]:
  """Adds each missing name to the `jax` module; returns the names added.

  Idempotent; never replaces a function JAX still defines. Call before the
  first fedjax call (importing fedjax itself works without it).
  """
  added = []
  for name, fn in _restored().items():
    if not hasattr(jax, name):
      setattr(jax, name, fn)
      added.append(name)
  return sorted(added)
