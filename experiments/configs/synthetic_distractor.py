"""Synthetic distractor (a shape inside the lesion map, a label-following distractor outside it
that flips at test): ResNet18 with the 3x3 stride-1 stem, one method, 2-class head.

    saljax train --config experiments/configs/synthetic_distractor.py:gradmask --workdir runs/distractor_gradmask

The argument picks the method (`saljax.losses.METHODS`). The checkpoint with the best validation
accuracy is kept; test AUC is the figure of merit.
"""

import ml_collections


def get_config(arg=None):
    method = arg or "gradmask"
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict({"name": "synthetic_distractor", "config": "default"})
    c.model = ml_collections.ConfigDict({"name": "resnet18", "kwargs": ml_collections.ConfigDict({"width": 16, "stem": "cifar"})})
    c.method = method
    c.loss = ml_collections.ConfigDict({"lam": 10.0, "reduction": "mean"} if method in ("gradmask", "gradmask_midl", "rrr") else {})
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
    c.batch_size = 32
    c.num_steps = 1000
    c.eval_every = 250
    c.checkpoint = ml_collections.ConfigDict({"every": 250, "best_metric": "validation/accuracy"})
    return c
