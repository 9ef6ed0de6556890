"""Server optimisers of Reddi et al. 2021, "Adaptive Federated Optimization".

Algorithm 2 of the paper updates the global model from the mean client delta
Delta_t (no bias correction, second moment started at tau^2):

    m_t = b1 m_{t-1} + (1 - b1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                  (FedAdagrad)
    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (FedYogi)
    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                       (FedAdam)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

optax's adam / yogi / adagrad differ in small ways (bias correction; yogi's
first moment starting at its accumulator value; adagrad's eps inside the root
and no momentum), so the rules are written here as optax transformations.
They receive the pseudo-gradient -Delta_t, like every server optimiser of
`algorithms.fedopt`; any optax transformation can be passed there instead.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

KINDS = ('adagrad', 'yogi', 'adam')


class AdaptiveServerState(NamedTuple):
  """First moment m and second moment v, shaped like the params."""
  m: optax.Params
  v: optax.Params


def scale_by_adaptive_server(kind: str, b1: float = 0.9, b2: float = 0.99,
                             tau: float = 1e-3
                             ) -> optax.GradientTransformation:
  """m_t / (sqrt(v_t) + tau) of Algorithm 2, on the pseudo-gradient.

  Args:
    kind: 'adagrad', 'yogi' or 'adam' (the v_t rule).
    b1: first-moment decay (the paper uses 0.9 for all three).
    b2: second-moment decay of yogi and adam (0.99 in the paper).
    tau: adaptivity; also v's start value is tau^2.
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown adaptive server optimiser {kind!r}; choose one '
                     f'of {KINDS}.')
  if not tau > 0:
    raise ValueError(f'The adaptivity tau must be > 0; got {tau} (the paper '
                     'uses 1e-3).')
  for name, beta in (('b1', b1), ('b2', b2)):
    if not 0.0 <= beta < 1.0:
      raise ValueError(f'{name} must lie in [0, 1); got {beta}.')

  def init(params):
    return AdaptiveServerState(
        m=jax.tree.map(jnp.zeros_like, params),
        v=jax.tree.map(lambda p: jnp.full_like(p, tau ** 2), params))

  def second_moment(v, g):
    sq = jnp.square(g)
    if kind == 'adagrad':
      return v + sq
    if kind == 'yogi':
      return v - (1.0 - b2) * sq * jnp.sign(v - sq)
    return b2 * v + (1.0 - b2) * sq

  def update(grads, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.m, grads)
    v = jax.tree.map(second_moment, state.v, grads)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    return updates, AdaptiveServerState(m=m, v=v)

  return optax.GradientTransformation(init, update)


def adaptive_server_optimizer(kind: str, learning_rate: float,
                              b1: float = 0.9, b2: float = 0.99,
                              tau: float = 1e-3
                              ) -> optax.GradientTransformation:
  """FedAdagrad / FedYogi / FedAdam's server optimiser at rate eta."""
  if not learning_rate > 0:
    raise ValueError(f'The server learning rate must be > 0; got '
                     f'{learning_rate}.')
  return optax.chain(scale_by_adaptive_server(kind, b1, b2, tau),
                     optax.scale_by_learning_rate(learning_rate))
