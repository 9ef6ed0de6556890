r"""Continual keyword learning after enrollment, without forgetting.

A DS-CNN pre-trained on many speakers (configs/kws_central.py) is enrolled
by users of rare accents from a few labelled utterances per keyword, then
keeps learning from each user's unlabelled stream: pseudo-labels accepted
only when keyword verification agrees, and a regulariser (LwF distillation,
L2-SP or EWC) that keeps the pre-trained model's accuracy on everybody else.
A quarter of the way into the stream the background gets noisier (5 dB SNR
at its end), which enrollment never heard; pseudo-labels and verification
then come from the model with batch-norm statistics of the recent clips
(learner.method.pseudo_label.teacher_bn), while the student trains with
the source ones.
Each variant below changes a few fields of the base run; all of them run on
the same users, streams and pre-trained model.

    python -m experiments.continual --config=configs/continual_kws.py \
        --workdir=benchmarks/results/continual
    python -m experiments.continual --config=configs/continual_kws.py:smoke \
        --workdir=/tmp/continual_smoke
    # int8 training of the norms and biases only:
    python -m experiments.continual --config=configs/continual_kws.py \
        --config.quant=int8_fwd_bwd_sr --config.trainable.name=bias_only \
        --workdir=/tmp/continual_int8
"""
import ml_collections

from configs import common
from configs import kws_central
from ondevice import options
from sparse_updates import presets


def _variants() -> ml_collections.ConfigDict:
  """name -> fields that differ from the base run (merged recursively)."""
  return ml_collections.ConfigDict({
      'verified+lwf': {},
      'no_regularizer': {'regularizer': {'name': 'none'}},
      'no_verification': {'pseudo': {'verify': False}},
      'no_teacher_bn': {
          'learner': {'method': {'pseudo_label': {'teacher_bn': False}}}},
      'verified+l2_sp': {'regularizer': {'name': 'l2_sp'}},
      'verified+ewc': {'regularizer': {'name': 'ewc'}},
      'bn_adapt': {'learner': {'method': {'name': 'bn_adapt'}}},
      'tent': {'learner': {'method': {'name': 'tent'}}},
  })


def _learner() -> ml_collections.ConfigDict:
  """The learner: shared step counts and one sub-config per method."""
  return ml_collections.ConfigDict(dict(
      steps_per_chunk=8,        # Train steps per chunk (pseudo_label, tent).
      batch_size=32,            # Labelled (or TENT) rows per step.
      method=dict(
          name='pseudo_label',  # One of continual.learner.METHODS.
          pseudo_label=dict(
              learning_rate=1e-3,
              replay_capacity=256,  # 0 turns replay off.
              augment=False,        # SpecAugment views (objectives.augment).
              teacher_bn=True,      # Label with BN statistics of recent clips.
              bn_window=512,        # Recent clips those statistics come from.
              bn_prior=16.0),       # Schneider et al.'s N.
          bn_adapt=dict(bn_window=512, bn_prior=16.0),
          tent=dict(learning_rate=1e-3)),
  ))


def _regularizer() -> ml_collections.ConfigDict:
  """One sub-config per continual.regularizers.REGULARIZERS name."""
  return ml_collections.ConfigDict(dict(
      name='distillation',
      none={},
      distillation=dict(
          strength=2.0,
          temperature=2.0,
          min_teacher_confidence=0.8,  # Distil only where the teacher is sure.
          batch_size=16),              # Unlabelled rows per step.
      l2_sp=dict(strength=1.0),
      ewc=dict(strength=100.0, fisher_examples=512),
  ))


def _stream() -> ml_collections.ConfigDict:
  """The unlabelled stream and its drift (one sub-config per drift)."""
  return ml_collections.ConfigDict(dict(
      length=864,
      chunk_size=108,
      mix=(0.5, 0.15, 0.2, 0.15),  # user keyword, user other, others, noise.
      # Enrolled in quiet, then the device moves somewhere noisy: enrollment
      # cannot see the new acoustics, the stream can.
      drift=dict(
          name='noise',            # One of continual.streams.DRIFTS.
          none={},
          noise=dict(start=0.25, snr_db=5.0),
          speed=dict(start=0.25, rate=1.3)),
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  # The global model, pre-trained once and cached (central.pretrain).
  config.pretrain = kws_central.get_config()
  config.pretrain.num_steps = 1200
  config.pretrain.eval_every = 400
  config.pretrain.checkpoint_every = 200
  config.pretrain_dir = ''    # '' = <speech cache>/continual/pretrain_<hash>.
  config.quant = 'none'       # See quantized_training.QUANT_NAMES.
  config.trainable = options.named(presets.PRESET_BUILDERS, 'full')

  config.users = ml_collections.ConfigDict(dict(
      num_typical=0,          # Users of common accents.
      num_outlier=3,          # Users of rare accents.
      first_index=200,        # Speakers the pre-training corpus never had.
      utterances_per_word=20,
      other_utterances=6,     # Of each out-of-vocabulary word.
      num_noise=150,
      num_enroll=3,           # K labelled utterances per keyword.
      num_test=5,             # Held-out utterances per keyword.
  ))
  config.stream = _stream()
  config.enroll = ml_collections.ConfigDict(dict(
      num_steps=30, batch_size=32, learning_rate=3e-4, augment=False))
  config.pseudo = ml_collections.ConfigDict(dict(
      confidence=0.8,         # Minimum softmax probability.
      target_far=0.01,        # Verification false-accept rate.
      verify=True,
  ))
  config.learner = _learner()
  config.regularizer = _regularizer()
  config.variants = _variants()
  config.main_variant = 'verified+lwf'  # The method under test.
  config.global_eval_examples = 500  # Held-out clips scored per chunk.
  config.seed = 0

  if args.smoke:
    config.pretrain = kws_central.get_config('smoke')
    config.users.update(num_outlier=1, utterances_per_word=4,
                        other_utterances=1, num_noise=16, num_enroll=1,
                        num_test=1)
    config.stream.update(length=96, chunk_size=48)
    config.enroll.update(num_steps=2, batch_size=16)
    config.learner.update(steps_per_chunk=1, batch_size=16)
    config.learner.method.pseudo_label.update(replay_capacity=32,
                                              bn_window=64)
    config.learner.method.bn_adapt.bn_window = 64
    config.regularizer.ewc.fisher_examples = 32
    config.global_eval_examples = 64
    # Every variant of the full run, so that the smoke run exercises each.
  return config
