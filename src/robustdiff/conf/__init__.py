"""robustdiff's Hydra configs (package data, reached as ``pkg://robustdiff.conf``): one primary config per
CLI (train.yaml, train_edm.yaml, generate.yaml) and the groups they compose, including ``experiment/``, the
paper's recipes by name."""
