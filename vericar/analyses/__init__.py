"""The analyses behind single notebooks, each named after what it studies. They import the core pipeline
(vericar.data, models, losses, train, runs, embed, retrieval, metrics, evaluation, ood, predict); the core never
imports them (an import-linter contract in tests/test_layout.py keeps it so).

* :mod:`.gradient_bug` -- notebook 02: the re-implementation's "gradient bug" and its other suspects
* :mod:`.seed_losses`  -- notebook 02: the re-implementation's losses reproduced (registered by name with
  vericar.losses on import) and the one-batch gradient report
* :mod:`.embeddings`   -- notebook 04: UMAP maps, neighbourhood purity, silhouette
* :mod:`.errors`       -- notebook 05: accuracy per make / type / year / model, confusions
* :mod:`.open_world`   -- notebook 06: KNN+ on held-out models / years / makes, adding cars without retraining
* :mod:`.open_set`     -- notebook 06: the SSB open-set split, its scores and OSCR
* :mod:`.hierarchy`    -- notebook 07: MS against the hierarchical HiMS losses
"""
