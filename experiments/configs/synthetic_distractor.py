"""Synthetic distractor (a shape inside the lesion map, a label-following distractor outside it
that flips at validation and test; 64x64): SimpleCNN, one method, 2-class head.

    saljax train --config experiments/configs/synthetic_distractor.py:gradmask --workdir runs/distractor_gradmask

The argument picks the method (`saljax.losses.METHODS`), and `clean` trains CE where the distractor
agrees with the label only half the time in training (it carries no information: the reference).
The test AUC of the checkpoint with the best validation AUC is the figure of merit. For the ResNet-18 of GradMask's follow-up:
`model.name='resnet18' model.kwargs={'width': 16, 'stem': 'cifar'}` (hours on 2 CPU cores for a
whole suite; minutes on a GPU).

The suite (every method over seeds, tables and figures in experiments/results/):

    saljax experiment synthetic_distractor --seeds 5
"""

import ml_collections

from saljax.experiment import Suite, Target

METHODS = ("clean", "ce", "gradmask", "gradmask_midl", "rrr", "cyborg", "cyborg_pred", "dd_difference", "dd_paired",
           "dd_divergence")


def get_config(arg=None):
    method = arg or "gradmask"
    c = ml_collections.ConfigDict()
    # 64x64; validation flipped like test, as the follow-up paper's, so selection on it sees the shortcut.
    c.dataset = ml_collections.ConfigDict({"name": "synthetic_distractor", "config": "flipped_validation"})
    if method == "clean":
        c.dataset.overrides = ml_collections.ConfigDict({"distractor_agreement": 0.5})
    c.model = ml_collections.ConfigDict({"name": "simple_cnn"})
    c.method = "ce" if method == "clean" else method
    # lam chosen on validation saliency_inside (validation cannot see the shortcut through accuracy):
    # in single probe runs lam = 100 left 86% of the gradient energy outside the lesion, 1000 did not.
    gradient_penalty = method in ("gradmask", "gradmask_midl", "rrr")
    c.loss = ml_collections.ConfigDict({"lam": 1000.0, "reduction": "mean"} if gradient_penalty else {})
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"})
    c.batch_size = 32
    c.num_steps = 600
    c.eval_every = 100
    c.checkpoint = ml_collections.ConfigDict({"every": c.num_steps, "best_metric": "validation/roc_auc",
                                              "keep_best": 1, "keep_latest": 1})
    return c


def get_suite():
    def auc(method):
        return lambda m: m[method]["test/roc_auc"]

    return Suite(
        name="synthetic_distractor",
        title="shape inside the lesion, distractor outside flipped at test (64x64), SimpleCNN",
        methods=METHODS,
        splits=("validation", "test"),
        metrics=("roc_auc", "accuracy", "saliency_inside"),
        checkpoint="best",
        quick=("num_steps=100", "eval_every=50", "checkpoint.every=100"),
        curve_metric="validation/roc_auc",
        targets=(
            Target("CE test AUC collapses", auc("ce"), "<=", 0.20),
            Target("GradMask test AUC (follow-up paper, ResNet-18: 0.76 ± 0.04)", auc("gradmask"), ">=", 0.80),
        ),
        notes=(
            "The follow-up paper's selection: validation is flipped like test (the `flipped_validation` config), and "
            "each run reports the checkpoint with the best validation AUC, evaluated every 100 steps. "
            "`saliency_inside` (share of input-gradient energy inside the lesion) chose lam for the gradient "
            "penalties, on the unflipped validation split, before the flip (single probe runs of 300 steps, "
            "validation share inside: lam = 100 0.14 at 32x32; lam = 1000 0.57 at 32x32, 0.75 at 48x48 and 0.79 at "
            "64x64; lam = 10000 0.55 at 32x32). Other settings are fixed a priori: Adam 1e-3 with a cosine decay "
            "to 0 over 600 steps, batch 32, docs/methods.md defaults for the CAM losses. 600 steps because the clean "
            "reference had not converged at 400 (probe runs, validation accuracy / AUC: seeds 0-2 at 400 steps "
            ".945/.981, .905/.963, .885/.959; seed 2 at 800 steps .920/.982). SimpleCNN instead of the follow-up's "
            "ResNet-18 keeps the suite within about an hour on 2 CPU cores."
        ),
    )
