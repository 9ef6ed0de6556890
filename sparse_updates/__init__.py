"""Which params train: bias-only, last layers, sparse channels, lite residuals.

Public API:
  * ``trainable_paths(params, rules)``, ``assign``, ``channel_fractions``:
    ordered regex rules over parameter paths, first match wins, None freezes.
  * ``get_rules(name, params, **kw)`` and ``PRESETS``: full, bias_only,
    norm_only, classifier_only, last_k, sparse_channels, tte, lite_residual;
    ``model_layers`` and ``forward_order`` for layer-wise schemes;
    ``resolve(name, params)`` gives a preset's trainable paths and channel
    masks in one call (what the experiment binaries use).
  * ``update_masks``, ``masked_optimizer``: partial-channel updates.
  * ``with_compact_relu``: 1-bit ReLU masks for the backward pass (TinyTL).
  * ``LiteResidualModel``, ``dscnn_blocks``, ``from_pretrained``: TinyTL's
    lite residual branches around a frozen model.
  * ``fold_batch_norm``: the deployed (folded) form of a batch-norm model.
  * ``contribution_units``, ``greedy_search``: budgeted scheme search
    (Lin et al., 2022); ``sparse_updates.experiment.run`` runs the study.
"""

from sparse_updates.batchnorm_folding import fold_batch_norm
from sparse_updates.channel_masks import masked_optimizer
from sparse_updates.channel_masks import update_masks
from sparse_updates.compact_relu import packed_relu
from sparse_updates.compact_relu import with_compact_relu
from sparse_updates.lite_residual import dscnn_blocks
from sparse_updates.lite_residual import from_pretrained
from sparse_updates.lite_residual import LiteResidualModel
from sparse_updates.presets import forward_order
from sparse_updates.presets import get_rules
from sparse_updates.presets import model_layers
from sparse_updates.presets import PRESETS
from sparse_updates.presets import resolve
from sparse_updates.presets import Scheme
from sparse_updates.rules import assign
from sparse_updates.rules import channel_fractions
from sparse_updates.rules import trainable_paths
from sparse_updates.rules import validate_rules
from sparse_updates.search import contribution_units
from sparse_updates.search import greedy_search
