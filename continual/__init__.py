"""Continual learning after enrollment, without forgetting.

Public API:
  * ``run(config, workdir)``: the experiment of configs/continual_kws.py;
    ``validate_config(config)`` checks a config (every variant) before any
    data loads (``continual.validation``).
  * streams: ``make_stream``, ``split_user``, ``DriftConfig``: a user's
    unlabelled, time-ordered stream with optional acoustic drift.
  * pseudo_label: ``build_templates``, ``template_scores``,
    ``calibrate_threshold``, ``pseudo_label``, ``label_quality``: labels
    accepted only when keyword verification agrees.
  * regularizers: ``with_distillation`` (LwF), ``with_l2_sp``, ``with_ewc``,
    ``fisher_diagonal``, ``build``: loss wrappers that keep the pre-trained
    model's behaviour.
  * replay: ``init``, ``add``, ``sample``: a reservoir-sampled buffer.
  * tta: ``adapt_batch_norm`` (Schneider et al. 2020) and TENT
    (``make_tent_step``, Wang et al. 2021).
"""
from continual import pseudo_label
from continual import regularizers
from continual import replay
from continual import streams
from continual import tta
from continual.experiment import run
from continual.experiment import validate_config
