r"""Centralised Fashion-MNIST with the small CNN.

Reads the Debian package dataset-fashion-mnist (no download).

    python -m experiments.train --config=configs/fmnist_central.py \
        --workdir=/tmp/fmnist_central
    python -m experiments.train --config=configs/fmnist_central.py:smoke \
        --workdir=/tmp/run
"""
import ml_collections

from configs import common
from ondevice import options
from quantized_training import optimizers
from sparse_updates import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist',
      data_dir='',               # '' = /usr/share/datasets/fashion-mnist.
      max_train=0,               # 0 = all 60,000.
      max_test=0,                # 0 = all 10,000.
  ))
  config.model = 'cnn'
  config.norm = 'none'
  config.quant = 'none'
  config.trainable = options.named(presets.PRESET_BUILDERS, 'full')
  config.optimizer = 'adam'
  # Optimiser moments as int8 codes, and QAS training of integer weights
  # (Lin et al. 2022): quantized_training.optimizers.
  config.optimizer_state = options.named(optimizers.STATE_FORMATS, 'float')
  config.qas = options.named(optimizers.QAS_MODES, 'none')
  config.learning_rate = 1e-3
  config.schedule = 'cosine'
  config.warmup_steps = 0
  config.weight_decay = 0.0
  config.momentum = 0.9
  config.grad_clip = 0.0
  config.label_smoothing = 0.0
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_steps = 2000
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 1000
  config.seed = 0

  if args.smoke:
    config.data.max_train = 512
    config.data.max_test = 256
    config.num_steps = 20
    config.batch_size = 32
    config.eval_batch_size = 256
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10
  return config
