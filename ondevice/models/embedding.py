"""Unit-norm embeddings on top of any backbone, for speaker / user verification.

A projection of the backbone's pooled features followed by L2 normalisation,
so that scores are cosine similarities, as in the GE2E speaker verifier
(Wan et al., 2018, "Generalized End-to-End Loss for Speaker Verification")
and in FedUV (Hosseini et al., 2021, "Federated Learning of User
Verification Models Without Sharing Embeddings").

Parameter paths: backbone/... (the backbone's own paths, without its
classifier, which is never created), head/projection/{kernel,bias}.
"""

from typing import Any

import flax.linen as nn
import jax

from ondevice.models import layers


class EmbeddingHead(nn.Module):
  """Dense projection to `embedding_dim`, then L2 normalisation.

  Attributes:
    embedding_dim: size of the unit-norm embedding.
    dot_general: replaces lax.dot_general in the projection (None: lax's).
    dot_general_cls: a module class used instead (e.g. int8 with stochastic
      rounding, which draws the 'quant' RNG stream).
  """
  embedding_dim: int
  dot_general: layers.DotGeneral = None
  dot_general_cls: layers.ModuleClass = None

  def __post_init__(self):
    layers.validate_positive('embedding_dim', self.embedding_dim)
    super().__post_init__()

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = nn.Dense(self.embedding_dim, dot_general=self.dot_general,
                 dot_general_cls=self.dot_general_cls,
                 name='projection')(features)
    return layers.l2_normalize(x)


class EmbeddingModel(nn.Module):
  """Any classifier's `features`, projected and L2-normalised.

  Attributes:
    backbone: a module with a `features(x, train)` method, e.g. a DSCNN from
      `build_model`; its classifier is left unused.
    embedding_dim: size of the unit-norm embedding.
    dot_general, dot_general_cls: the quantisation hooks of the projection
      (None: lax's); `build_embedding_model` passes the backbone's hooks here
      too.
    conv_general_dilated, conv_general_dilated_cls: accepted, like every
      model's hooks (`layers.QUANT_HOOKS`), so one set of quant keyword
      arguments builds any model; the head has no convolution, and the
      backbone receives its own hooks when it is built.
  """
  backbone: Any
  embedding_dim: int = 128
  dot_general: layers.DotGeneral = None
  conv_general_dilated: layers.ConvGeneralDilated = None
  dot_general_cls: layers.ModuleClass = None
  conv_general_dilated_cls: layers.ModuleClass = None

  def __post_init__(self):
    if not callable(getattr(self.backbone, 'features', None)):
      raise ValueError(
          f'backbone {type(self.backbone).__name__} has no features(x, train) '
          'method; pass a model from ondevice.models.build_model.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Unit-norm embeddings [B, embedding_dim]."""
    feats = self.backbone.features(x, train)
    return EmbeddingHead(self.embedding_dim, dot_general=self.dot_general,
                         dot_general_cls=self.dot_general_cls,
                         name='head')(feats)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The backbone's pooled features, before the projection."""
    return self.backbone.features(x, train)
