"""Models chosen by name: DS-CNN keyword spotters and small image classifiers.

Every model, the embedding model included, takes the quantisation hooks
`QUANT_HOOKS` (`dot_general`, `conv_general_dilated`, `dot_general_cls`,
`conv_general_dilated_cls`; None: lax's), which is exactly what
`quantized_training.get_quant(name).model_kwargs()` returns, exposes `features(x, train)` (the
classifier's input) and `__call__(x, train=False)` (logits), and names its
parameters stably (conv0, dw3, pw3_norm, hidden1, classifier, ...) so that
trainable subsets can be chosen by regex over paths like 'pw3/kernel'.

    model = build_model('ds_cnn_s', num_classes=36, norm='group')
    variables = model.init(rng, jnp.zeros([1, 98, 40]))
    logits = model.apply(variables, x)
    emb = model.apply(variables, x, method=model.features)

Size presets for budget sweeps (10 classes, 28x28x1 inputs, norm='none'):
  cnn_2k   ~2.1k  channels (10, 20), global average pool, no hidden layer
  cnn_20k  ~19k   channels (32, 64), global average pool, no hidden layer
  cnn_200k ~195k  channels (32, 64), flattened, hidden (56,)
  mlp_2k   ~2.4k  hidden (3,);  mlp_20k ~20k hidden (25,);
  mlp_200k ~204k  hidden (256,)
Any other size: pass `channels=` / `hidden=` (see the formulas in image.py
and dscnn.py) and check with `count_params`.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from ondevice.models.dscnn import DSCNN
from ondevice.models.dscnn import DSCNN_PRESETS
from ondevice.models.embedding import EmbeddingHead
from ondevice.models.embedding import EmbeddingModel
from ondevice.models.image import MLP
from ondevice.models.image import SmallCNN
from ondevice.models.layers import l2_normalize
from ondevice.models.layers import NORMS
from ondevice.models.layers import QUANT_HOOKS

# name -> (module class, preset fields). Fields given to build_model win.
_REGISTRY = {
    **{name: (DSCNN, preset) for name, preset in DSCNN_PRESETS.items()},
    'cnn': (SmallCNN, dict(channels=(32, 64), hidden=(128,))),
    'cnn_2k': (SmallCNN, dict(channels=(10, 20), hidden=(), pool='avg')),
    'cnn_20k': (SmallCNN, dict(channels=(32, 64), hidden=(), pool='avg')),
    'cnn_200k': (SmallCNN, dict(channels=(32, 64), hidden=(56,))),
    'mlp': (MLP, dict(hidden=(128,))),
    'mlp_2k': (MLP, dict(hidden=(3,))),
    'mlp_20k': (MLP, dict(hidden=(25,))),
    'mlp_200k': (MLP, dict(hidden=(256,))),
}
MODEL_NAMES = tuple(_REGISTRY)

__all__ = [
    'DSCNN', 'EmbeddingHead', 'EmbeddingModel', 'MLP', 'MODEL_NAMES', 'NORMS',
    'QUANT_HOOKS', 'SmallCNN', 'build_embedding_model', 'build_model', 'count_params',
    'l2_normalize',
]


def build_model(name: str, num_classes: int, *, dot_general=None,
                conv_general_dilated=None, dot_general_cls=None,
                conv_general_dilated_cls=None, norm: Optional[str] = None,
                **kwargs: Any) -> nn.Module:
  """Builds the classifier registered under `name`.

  Args:
    name: one of MODEL_NAMES.
    num_classes: number of logits.
    dot_general: replaces lax.dot_general in every Dense (None: lax's).
    conv_general_dilated: replaces lax.conv_general_dilated in every conv.
    dot_general_cls, conv_general_dilated_cls: module-class forms of the two
      hooks (e.g. `get_quant(name).model_kwargs()`), for products that draw
      flax RNG streams.
    norm: 'batch', 'layer', 'group' or 'none'; None keeps the model's default
      ('batch' for DS-CNNs as in Zhang et al., 'none' for cnn and mlp).
    **kwargs: overrides of the model's fields, e.g. channels=32.

  Returns:
    An unbound flax module.

  Raises:
    ValueError: for an unknown name, norm or field.
  """
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names are {MODEL_NAMES}.')
  cls, preset = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
        f'Model {name!r} ({cls.__name__}) has no field(s) {unknown}; valid '
        f'fields are {sorted(fields)}.')
  config = {**preset, **kwargs}
  if norm is not None:
    config['norm'] = norm
  return cls(num_classes=num_classes, dot_general=dot_general,
             conv_general_dilated=conv_general_dilated,
             dot_general_cls=dot_general_cls,
             conv_general_dilated_cls=conv_general_dilated_cls, **config)


def build_embedding_model(name: str, embedding_dim: int, *, dot_general=None,
                          conv_general_dilated=None, dot_general_cls=None,
                          conv_general_dilated_cls=None,
                          norm: Optional[str] = None,
                          **kwargs: Any) -> EmbeddingModel:
  """A `build_model` backbone with a unit-norm `embedding_dim` head.

  The backbone's classifier is never created, so num_classes is irrelevant
  and set to 1. The hooks reach the backbone and the projection alike.
  """
  hooks = dict(dot_general=dot_general,
               conv_general_dilated=conv_general_dilated,
               dot_general_cls=dot_general_cls,
               conv_general_dilated_cls=conv_general_dilated_cls)
  backbone = build_model(name, 1, norm=norm, **hooks, **kwargs)
  return EmbeddingModel(backbone=backbone, embedding_dim=embedding_dim,
                        **hooks)


def count_params(params: Any) -> int:
  """Total number of scalars in a PyTree, e.g. `variables['params']`."""
  return int(sum(np.prod(np.shape(leaf))
                 for leaf in jax.tree_util.tree_leaves(params)))
