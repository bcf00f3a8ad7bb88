"""The red-herring synthetic set (Viviano et al., ICLR 2021) at the paper's settings: ResNet-18, one method.

    saljax train --config experiments/configs/red_herring.py:gradmask --workdir runs/red_herring_gradmask

One cross (class 0) or two (class 1) inside the mask; a 2x3 distractor outside it that tells the
class in training and sits on the other side at validation and test. ResNet-18 with a 3x3
stride-1 stem and no max-pool (width 64, one channel, two classes); Adam, batch 16, 100 epochs of
the 500 training images; the test ROC AUC of the checkpoint with the best validation AUC (evaluated
every epoch). Per-method learning rates and penalty weights are the paper's tuned values.

The suite (the paper's 10 seeds; sized for a GPU, `red_herring_cpu` is the CPU-sized variant). A
method's 10 seeds train as one vmapped program (CE: 3.8 minutes on one H200); `-v` shows each
evaluation as it goes:

    saljax experiment red_herring --seeds 10
    saljax experiment red_herring -v --seeds 10 --methods gradmask
"""

import ml_collections

from saljax.experiment import Suite, Target

METHODS = ("ce", "gradmask", "rrr", "masked_images", "actdiff", "actdiff_discriminator", "rrr_g", "hint")
EPOCH = 500 // 16  # steps per epoch (31 full batches)

# The paper's tuned settings: learning rate and loss options per method.
SETTINGS = {
    "ce": {"learning_rate": 3.11e-4, "loss": {}},
    "gradmask": {"learning_rate": 0.01, "loss": {"lam": 0.2034, "reduction": "sum"}},
    "rrr": {"learning_rate": 1e-5, "loss": {"lam": 10.0, "reduction": "sum"}},
    "masked_images": {"learning_rate": 3.11e-4, "loss": {}},
    "actdiff": {"learning_rate": 3.11e-4, "loss": {"lam": 0.115}},
    "actdiff_discriminator": {"learning_rate": 3.71e-4, "loss": {"lam": 10.0, "update_every": 10, "lr": 0.01}},
    # Not in the paper: the Grad-CAM penalties at the CE learning rate and their presets' weights, fixed in advance.
    "rrr_g": {"learning_rate": 3.11e-4, "loss": {}},
    "hint": {"learning_rate": 3.11e-4, "loss": {}},
}
PUBLISHED_AUC = {"ce": "0.00 ± 0.00", "gradmask": "0.76 ± 0.04", "rrr": "0.49 ± 0.08", "masked_images": "0.99 ± 0.02",
                 "actdiff": "1.00 ± 0.00", "actdiff_discriminator": "0.92 ± 0.12"}
PUBLISHED_IOU = {"ce": (".07", ".08"), "gradmask": (".46", ".52"), "rrr": (".08", ".41"), "actdiff": (".40", ".62")}


def make_config(method: str, *, width: int, epochs: int) -> ml_collections.ConfigDict:
    settings = SETTINGS[method]
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict({"name": "red_herring", "config": "default"})
    c.model = ml_collections.ConfigDict({"name": "resnet18", "kwargs": {"width": width, "stem": "cifar"}})
    c.method = method
    c.loss = ml_collections.ConfigDict(settings["loss"])
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": settings["learning_rate"]})
    c.batch_size = 16
    c.num_steps = epochs * EPOCH
    c.eval_every = EPOCH
    c.log_every = EPOCH
    c.eval_batch_size = 128
    c.checkpoint = ml_collections.ConfigDict({"every": epochs * EPOCH, "best_metric": "validation/roc_auc",
                                              "keep_best": 1, "keep_latest": 1})
    return c


def get_config(arg=None):
    return make_config(arg or "gradmask", width=64, epochs=100)


def make_suite(name: str, title: str, notes: str, quick: tuple[str, ...] = ()) -> Suite:
    def auc(method):
        return lambda m: m[method]["test/roc_auc"]

    published = tuple((m, "test/roc_auc", f"{PUBLISHED_AUC[m]} (Viviano et al. 2021, 10 seeds)") for m in METHODS
                      if m in PUBLISHED_AUC)
    published += tuple((m, f"test/{kind}/saliency_iou", f"{PUBLISHED_IOU[m][i]} (Viviano et al. 2021)")
                       for m in METHODS if m in PUBLISHED_IOU for i, kind in enumerate(("gradient", "integrated_gradients")))
    return Suite(
        name=name,
        title=title,
        methods=METHODS,
        splits=("validation", "test"),
        metrics=("roc_auc", "accuracy"),
        map_metrics=("gradient/saliency_iou", "integrated_gradients/saliency_iou"),
        checkpoint="best",
        quick=quick,
        curve_metric="validation/roc_auc",
        targets=(
            Target("CE test AUC collapses (paper 0.00)", auc("ce"), "<=", 0.05),
            Target("GradMask test AUC (paper 0.76 ± 0.04)", auc("gradmask"), ">=", 0.76),
            Target("ActDiff test AUC (paper 1.00 ± 0.00)", auc("actdiff"), ">=", 0.95),
        ),
        published=published,
        notes=notes + " RRR-G (the predicted class's Grad-CAM penalised outside the mask) and HINT (the true class's "
        "Grad-CAM pulled towards the mask) are not in the paper: they run at CE's learning rate with their presets' "
        "weights (lam 1), fixed before any run. `actdiff_discriminator` runs at the authors' tuned setting for the "
        "discriminator (lam 10, an encoder update every 10 steps, discriminator Adam 0.01, encoder Adam 3.71e-4) on the "
        "suite's data (mask blur 0.5; their tuned run used 0.64).",
    )


def get_suite():
    return make_suite(
        "red_herring",
        "red-herring synthetic set (28x28 crosses, distractor flipped at validation and test), ResNet-18 width 64",
        "The paper's protocol and tuned settings throughout (see the config's docstring); `masked_images` trains on the "
        "images with everything outside the mask set to 0. Saliency IoU: the top-|H| pixels of the map against "
        "the mask, as the paper reports it.",
    )
