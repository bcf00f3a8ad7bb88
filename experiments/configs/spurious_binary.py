"""Spurious binary open-set task for the CAM methods: ResNet18, CE vs CYBORG vs Divisive Decisions.

    saljax train --config experiments/configs/spurious_binary.py:dd_paired --workdir runs/spurious_dd_paired

The argument picks the method (`saljax.losses.METHODS`; the CAM methods use alpha = 0.5). Evaluated
on `test_closed` (cue broken) and `test_open` (attack types never seen in training); the checkpoint
with the best validation AUC is kept.
"""

import ml_collections


def get_config(arg=None):
    method = arg or "cyborg"
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict({"name": "spurious_binary", "config": "default",
                                           "eval_splits": ("validation", "test_closed", "test_open")})
    c.model = ml_collections.ConfigDict({"name": "resnet18", "kwargs": ml_collections.ConfigDict({"width": 16, "stem": "cifar"})})
    c.method = method
    c.loss = ml_collections.ConfigDict({"lam": 10.0, "reduction": "mean"} if method in ("gradmask", "gradmask_midl", "rrr") else {})
    c.optimizer = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.005, "momentum": 0.9, "weight_decay": 1e-6})
    c.batch_size = 20
    c.num_steps = 1500
    c.eval_every = 300
    c.checkpoint = ml_collections.ConfigDict({"every": 300, "best_metric": "validation/roc_auc"})
    return c
