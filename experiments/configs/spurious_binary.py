"""Spurious binary open-set task for the CAM methods (32x32 RGB): SimpleCNN, one method.

    saljax train --config experiments/configs/spurious_binary.py:dd_paired --workdir runs/spurious_dd_paired

The argument picks the method (`saljax.losses.METHODS`; the CAM methods use their docs/methods.md
defaults), and `clean` trains CE where the cue is as likely on either class in training (the
reference). Evaluated on `test_closed` (cue broken, training attack types) and `test_open` (cue
broken, attack types never seen in training). CYBORG's protocol: SGD with momentum, the rate cut
tenfold every quarter of the run, and the checkpoint with the best validation accuracy. For the
ResNet-18 of the papers: `model.name='resnet18' model.kwargs={'width': 16, 'stem': 'cifar'}`.

The suite (every method over seeds, tables and figures in experiments/results/):

    saljax experiment spurious_binary --seeds 5
"""

import ml_collections

from saljax.experiment import Suite, Target

METHODS = ("clean", "ce", "gradmask", "gradmask_midl", "rrr", "cyborg", "cyborg_pred", "dd_difference", "dd_paired",
           "dd_divergence", "rrr_g", "hint")
NUM_STEPS = 1000
# Grad-CAM penalty weights (sum reductions, as XIL), chosen on validation only: the largest power of ten in
# 1e-5..1 whose seed-0 probe run keeps validation accuracy within 5 points of CE's (0.980; validation carries
# the cue, so this only asks that the penalty leaves the task learnable). Probes, validation accuracy at
# step 1000: RRR-G 1 0.470, 0.1 0.505, 0.01 0.975; HINT 1 0.485, 0.1 0.545, 0.01 0.525, 1e-3 0.670,
# 1e-4 0.970, 1e-5 0.970. The min-max normalised Grad-CAM of a near-flat early map has large gradients.
CAM_PENALTY_LAM = {"rrr_g": 0.01, "hint": 1e-4}


def get_config(arg=None):
    method = arg or "cyborg"
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict({"name": "spurious_binary", "config": "default",
                                           "overrides": ml_collections.ConfigDict({"image_size": 32}),
                                           "eval_splits": ("validation", "test_closed", "test_open")})
    if method == "clean":
        c.dataset.overrides.cue_correlation = 0.5
    c.model = ml_collections.ConfigDict({"name": "simple_cnn"})
    c.method = "ce" if method == "clean" else method
    gradient_penalty = method in ("gradmask", "gradmask_midl", "rrr")
    c.loss = ml_collections.ConfigDict({"lam": 10.0, "reduction": "mean"} if gradient_penalty else {})
    if method in CAM_PENALTY_LAM:
        c.loss.lam = CAM_PENALTY_LAM[method]
    # CYBORG's optimiser: SGD with momentum, small weight decay, batch 20, the rate cut tenfold in steps.
    c.optimizer = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.005, "momentum": 0.9, "weight_decay": 1e-6,
                                             "schedule": "step", "decay_every": NUM_STEPS // 4, "decay_factor": 0.1})
    c.batch_size = 20
    c.num_steps = NUM_STEPS
    c.eval_every = 100
    c.checkpoint = ml_collections.ConfigDict({"every": NUM_STEPS, "best_metric": "validation/accuracy",
                                              "keep_best": 1, "keep_latest": 1})
    return c


def get_suite():
    def beats_cyborg(method, split):
        return lambda m: m[method][f"{split}/roc_auc"] - m["cyborg"][f"{split}/roc_auc"]

    return Suite(
        name="spurious_binary",
        title="binary task with a spurious cue, closed- and open-set tests (32x32 RGB), SimpleCNN",
        methods=METHODS,
        splits=("validation", "test_closed", "test_open"),
        metrics=("roc_auc", "accuracy", "saliency_inside"),
        checkpoint="best",
        quick=("num_steps=200", "eval_every=50", "optimizer.decay_every=50", "checkpoint.every=200"),
        curve_metric="validation/accuracy",
        targets=tuple(
            Target(f"{method} AUC above CYBORG on {split} ({method} - cyborg)", beats_cyborg(method, split), ">=", 0.0)
            for split in ("test_closed", "test_open")
            for method in ("dd_difference", "dd_paired", "dd_divergence")
        ),
        notes=(
            "The seed paper's claim is that training with both the true- and the false-class CAM (dd_*) beats "
            "CYBORG (true-class CAM only); the targets compare means, the confidence intervals say whether a "
            "difference is more than seed noise. Settings are fixed a priori, not tuned on any split: CYBORG's "
            "optimiser and selection (SGD 0.005, momentum 0.9, weight decay 1e-6, batch 20, the rate times 0.1 "
            f"every {NUM_STEPS // 4} steps of {NUM_STEPS}, the checkpoint with the best validation accuracy, evaluated every "
            "100 steps); the clean reference's validation accuracy converges (0.99 in a probe run) under them. "
            "docs/methods.md defaults for the CAM losses and lam = 10 (`mean` reduction) for the gradient penalties. "
            "RRR-G (lam 0.01) and HINT (lam 1e-4) at their presets otherwise, each weight the largest power of ten whose "
            "seed-0 probe kept validation accuracy within 5 points of CE's (at lam 1 neither model learns the task: "
            "validation accuracy 0.47-0.49; the probes are listed in the config)."
        ),
    )
