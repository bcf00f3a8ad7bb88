"""Decoy digits (RRR's DecoyMNIST protocol on scikit-learn's digits, 32x32): SimpleCNN, one method.

    saljax train --config experiments/configs/decoy_digits.py:gradmask --workdir runs/decoy_gradmask

The argument picks the method (`saljax.losses.METHODS`: ce, gradmask, gradmask_midl, rrr, cyborg,
cyborg_pred, dd_difference, dd_paired, dd_divergence) and `clean` trains CE on the decoy-free
config (the reference). Override any field: `... num_steps=2000 loss.lam=30.0`.
"""

import ml_collections

# Penalty weights per method, for the scale-free "mean" reductions of the gradient penalties.
_LOSS = {
    "gradmask": {"lam": 10.0, "reduction": "mean"},
    "gradmask_midl": {"lam": 10.0, "reduction": "mean"},
    "rrr": {"lam": 10.0, "reduction": "mean"},
}


def get_config(arg=None):
    method = arg or "gradmask"
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict({"name": "decoy_digits", "config": "clean" if method == "clean" else "default"})
    c.model = ml_collections.ConfigDict({"name": "simple_cnn"})
    c.method = "ce" if method == "clean" else method
    c.loss = ml_collections.ConfigDict(_LOSS.get(method, {}))
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 3e-3})
    c.batch_size = 32
    c.num_steps = 1000
    c.eval_every = 500
    c.log_every = 50
    return c
