"""The one table of every method's defaults (its paper's, or the XIL framework's), as plain data.

This module imports only the standard library, so that saljax and its PyTorch baseline (another interpreter, without
jax) read the same numbers: the baseline loads this file by path. `build` turns a row into a loss
with the term constructors of either implementation.

A row: `term` the penalty's constructor (None: CE only); `lam` the penalty weight next to CE with
weight 1, or `alpha` the CE weight with `1 - alpha` for the penalty; `ce_reduction` "mean" or "sum";
`options` fixed options of the penalty; `transform` a batch transform (by name) that the loss
applies before its pass (`transform_of: "loss"`) or that the penalty applies to a copy
(`transform_of: "term"`).
"""

import math
import numbers
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # CE alone.
    "ce": {"term": None},
    # GradMask (Simpson et al. 2019): the authors' final code, and the code at submission time.
    "gradmask": {"term": "gradmask", "lam": 1.0},
    "gradmask_midl": {"term": "gradmask", "lam": 1.0, "options": {"variant": "midl"}},
    # RRR (Ross et al. 2017): sum CE + lam * penalty.
    "rrr": {"term": "rrr", "lam": 1.0, "ce_reduction": "sum"},
    # CYBORG (Boyd et al. 2023) and Divisive Decisions (Piland et al. 2025): alpha CE + (1 - alpha) term.
    "cyborg": {"term": "cyborg", "alpha": 0.5},
    "cyborg_pred": {"term": "cyborg", "alpha": 0.5, "options": {"cam_class": "pred"}},
    "dd_difference": {"term": "dd_difference", "alpha": 0.5},
    "dd_paired": {"term": "dd_paired", "alpha": 0.5},
    "dd_divergence": {"term": "dd_divergence", "alpha": 0.5},
    # ActDiff (Viviano et al. 2021): CE + lam * activation distance.
    "actdiff": {"term": "actdiff", "lam": 1.0},
    # Its adversarial variant: CE + lam * BCE of a discriminator of z(x) vs z(x~) with flipped labels; the
    # authors' code defaults (discriminator Adam lr 1e-4, classifier updated every step; their lam default
    # 0 switches it off, 1 here as for ActDiff).
    "actdiff_discriminator": {"term": "actdiff_discriminator", "lam": 1.0},
    # XIL forms (Friedrich et al. 2023) of RRR-G (Schramowski et al. 2020), HINT (Selvaraju et al.
    # 2019) and RBR (Shao et al. 2021): CE + lam * term; lam is data-dependent (XIL tunes it per
    # dataset), choose it so that the term is about CE at initialisation.
    "rrr_g": {"term": "rrr_g", "lam": 1.0},
    "hint": {"term": "hint", "lam": 1.0},
    "rbr": {"term": "rbr", "lam": 1.0},
    # Saliency-guided training (Ismail et al. 2021): CE + 1 * KL.
    "sgt": {"term": "sgt", "lam": 1.0},
    # CDEP (Rieger et al. 2020), XIL's form: CE + lam * mean share of the logits explained by the region off
    # the map. XIL's rate on DecoyMNIST is 1e6, with raw 0..255 inputs and sum reductions; it does not carry
    # over to saljax's inputs in [0, 1]: the share is a sigmoid of beta - gamma, which grow with the input
    # scale (about 255x for a bias-free ReLU network), so there it saturates and needs a huge rate. Choose
    # lam so that the term is about CE at initialisation.
    "cdep": {"term": "cdep", "lam": 1.0},
    # Counterexamples (Teso and Kersting 2019): mean CE over the batch and its counterexamples.
    "counterexamples": {"term": "transformed_ce", "alpha": 0.5, "transform": "counterexamples", "transform_of": "term"},
    # ActDiff's baselines: train on masked images, train on shuffled images (CE only).
    "masked_images": {"term": None, "transform": "mask_outside", "transform_of": "loss"},
    "shuffled_images": {"term": None, "transform": "shuffle_outside", "transform_of": "loss"},
}

# GradMask's two code versions, as its term's option defaults (`gradmask(variant=...)`): the authors' final code
# ("default") and the code at submission time ("midl"); an option passed explicitly overrides them.
GRADMASK_VARIANTS: dict[str, dict[str, str]] = {
    "default": {"norm": "l1", "samples": "masked", "reduction": "sum"},
    "midl": {"norm": "l2sq", "samples": "positives", "reduction": "sum"},
}


def build(method: str, options: dict[str, Any], *, combine: Any, cross_entropy: Any, terms: Any, transforms: Any,
          partial: Any) -> Any:
    """The loss of `method` with `options` overriding its defaults (see the module docstring).

    `combine`, `cross_entropy`: the implementation's; `terms`, `transforms`: {name: constructor};
    `partial`: functools.partial. Options: `lam` or `alpha` (the row's weighting), the penalty's
    options, or, for rows with a transform, the transform's options; CE alone takes CE's options.
    """
    if method not in PRESETS:
        raise ValueError(f"method must be one of {sorted(PRESETS)}; got {method!r}")
    row = PRESETS[method]
    options = dict(options)
    weight = options.pop("alpha", row["alpha"]) if "alpha" in row else options.pop("lam", row.get("lam"))
    # A weight that is not a Python number (a traced value, swept in one program) was checked before tracing.
    if "alpha" in row and isinstance(weight, (int, float)) and not 0.0 <= weight <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {weight}")
    traced = hasattr(weight, "shape")  # an array: a swept value, whose concrete values were checked before tracing
    if ("alpha" not in row and weight is not None and not traced
            and not (isinstance(weight, numbers.Real) and not isinstance(weight, bool) and 0.0 <= float(weight) < math.inf)):
        raise ValueError(f"lam must be a finite number >= 0; got {weight!r}")
    transform = None
    if "transform" in row:
        transform = partial(transforms[row["transform"]], **options)
        options = {}
    if row["term"] is None:
        ce = cross_entropy(**options)
        return combine(ce, transform=transform) if row.get("transform_of") == "loss" else combine(ce)
    term = terms[row["term"]]
    fixed = dict(row.get("options", {}))
    if transform is not None:
        fixed["transform"] = transform
    reduction = row.get("ce_reduction", "mean")
    if "alpha" in row:
        return combine(cross_entropy(weight, reduction=reduction), term(weight=1.0 - weight, **{**fixed, **options}))
    return combine(cross_entropy(reduction=reduction), term(weight, **{**fixed, **options}))
