"""A fixed-size replay buffer filled by reservoir sampling.

Rehearsing a few stored examples next to new ones is a strong defence
against forgetting (Chaudhry et al. 2019, "On Tiny Episodic Memories in
Continual Learning", arXiv:1902.10486). With reservoir sampling (Vitter
1985, Algorithm R) the buffer holds, at every moment, a uniform sample of
everything offered so far, in memory fixed in advance: the n-th item
(0-based) fills slot n while the buffer is not full, and afterwards replaces
a uniformly chosen slot with probability capacity / (n + 1).

The buffer is a PyTree; `add` and `sample` are pure, jittable and take
explicit PRNG keys, so a run is reproducible and the buffer can be
checkpointed or vmapped over clients like any other state.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class ReplayBuffer(NamedTuple):
  """items: leaves [capacity, ...]; seen: int32 count of items offered."""
  items: PyTree
  seen: jax.Array

  @property
  def capacity(self) -> int:
    return int(jax.tree.leaves(self.items)[0].shape[0])


def init(capacity: int, example: PyTree) -> ReplayBuffer:
  """An empty buffer for items shaped like `example` (one item, no batch)."""
  if capacity < 1:
    raise ValueError(f'Replay capacity must be >= 1; got {capacity}.')
  items = jax.tree.map(
      lambda a: jnp.zeros((capacity,) + jnp.shape(a), jnp.asarray(a).dtype),
      example)
  return ReplayBuffer(items=items, seen=jnp.zeros((), jnp.int32))


def size(buffer: ReplayBuffer) -> jax.Array:
  """Number of filled slots."""
  return jnp.minimum(buffer.seen, buffer.capacity)


@jax.jit
def add(buffer: ReplayBuffer, items: PyTree, valid: jax.Array,
        key: jax.Array) -> ReplayBuffer:
  """Offers a batch of items (leaves [n, ...]) in order; `valid` [n] bool.

  Items with valid False are skipped and do not count as seen.
  """
  capacity = buffer.capacity

  def offer(buf, inputs):
    item, ok, index = inputs
    n = buf.seen
    draw = jax.random.randint(jax.random.fold_in(key, index), (), 0,
                              jnp.maximum(n + 1, 1))
    slot = jnp.where(n < capacity, n, draw)
    write = ok & (slot < capacity)
    new_items = jax.tree.map(
        lambda store, x: store.at[slot].set(
            jnp.where(write, x, store[jnp.minimum(slot, capacity - 1)]),
            mode='drop'), buf.items, item)
    return ReplayBuffer(new_items, n + ok.astype(jnp.int32)), None

  count = jnp.shape(valid)[0]
  buffer, _ = jax.lax.scan(
      offer, buffer, (items, jnp.asarray(valid, bool), jnp.arange(count)))
  return buffer


@functools.partial(jax.jit, static_argnames='batch_size')
def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int
           ) -> tuple[PyTree, jax.Array]:
  """Draws `batch_size` stored items uniformly with replacement.

  Returns:
    (items with leaves [batch_size, ...], mask [batch_size] float32); the
    mask is all zero while the buffer is empty.
  """
  filled = size(buffer)
  index = jax.random.randint(key, (batch_size,), 0, jnp.maximum(filled, 1))
  items = jax.tree.map(lambda store: store[index], buffer.items)
  mask = jnp.broadcast_to((filled > 0).astype(jnp.float32), (batch_size,))
  return items, mask
