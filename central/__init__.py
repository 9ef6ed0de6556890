"""Centralised training: the baseline, and the global models that
personalisation, continual learning and the sparse-update study start from.

`supervised.run(config, workdir)` trains a model on a dataset as a config
says, with every technique of the low-complexity area selectable there (the
int8 quant mode, the trainable preset, the int8 optimiser state and QAS);
`pretrain.pretrain(section, cache_dir)` caches such a run so that every study
with the same pre-training reuses one finished model.

It sits above `ondevice/` (which imports no research area) and above
`quantized_training/` and `sparse_updates/`, whose techniques it applies;
few_shot, continual and sparse_updates' own study import it for their global
models.
"""
