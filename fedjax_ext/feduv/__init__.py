"""FedUV against softmax baselines on speaker verification.

`experiment.run(config, workdir)` trains every variant of `config.variants`
(see `variants.VARIANTS`) on the same users and trials; `report` turns the
rows into results.json, results.md and a ROC plot, and merges runs of
different variants. The method itself (loss, scoring, metrics, codes) lives
in `fedjax_ext.verification` and `fedjax_ext.codes`.
"""
