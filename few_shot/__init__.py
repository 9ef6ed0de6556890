"""Few-shot keyword spotting: episodes, meta-learners and personalisation.

Public API:
  * episodes: ``keyword_table``, ``speaker_table``, ``sample_keyword_tasks``,
    ``sample_speaker_tasks`` (N-way K-shot and per-speaker tasks).
  * enrollment: ``enrollment_table``, ``all_enrollment_tasks``,
    ``sample_enrollment_tasks`` (a user's K utterances per keyword).
  * meta-learners, each a factory of a ``MetaLearner`` (init, apply, ...):
    ``maml``, ``fomaml``, ``anil``, ``meta_sgd`` (few_shot.maml),
    ``reptile`` (few_shot.reptile), ``protonet`` (few_shot.protonets), and
    the table ``META_LEARNERS`` with ``build`` / ``from_config``
    (few_shot.meta_learners).
  * personalisation: ``finetune_adapter``, ``learner_adapter``,
    ``make_user_evaluator`` (few_shot.personalize) and
    ``detection_at_far`` (few_shot.detection).
  * the experiment: ``run(config, workdir)`` and ``validate_config``
    (few_shot.experiment); results.json, report.md and the plot
    (few_shot.report).
"""


def run(config, workdir, **kwargs):
  """Runs the few-shot experiment (see few_shot.experiment.run)."""
  from few_shot import experiment  # pylint: disable=g-import-not-at-top
  return experiment.run(config, workdir, **kwargs)
