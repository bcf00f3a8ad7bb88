"""`for_method`: the full loss each method trains with, from the one table of defaults (`preset_table`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from saljax.losses import adversarial, cam, contextual, gradcam, gradient, preset_table, second_pass, transforms
from saljax.losses.base import Loss, combine, cross_entropy

__all__ = ["for_method", "METHODS", "PRESETS"]

PRESETS = preset_table.PRESETS

# Every public term constructor of the family modules, by name: a new term needs only its module's
# `__all__` and a row of the preset table.
_TERMS: Mapping[str, Callable[..., Any]] = {
    name: getattr(module, name)
    for module in (gradient, cam, gradcam, second_pass, adversarial, contextual)
    for name in module.__all__
    if callable(getattr(module, name))
}
_TRANSFORMS: Mapping[str, Callable[..., Any]] = {
    "counterexamples": transforms.counterexamples,
    "mask_outside": transforms.mask_outside,
    "shuffle_outside": transforms.shuffle_outside,
}


def for_method(method: str, **options: Any) -> Loss:
    """The full loss a method trains with, e.g. `for_method("cyborg", alpha=0.5)`.

    Defaults come from `PRESETS` (the papers'). Methods weighted by `lam` (gradmask*, rrr, rbr,
    rrr_g, hint, actdiff, actdiff_discriminator, sgt, cdep) give `CE + lam * term` and take `lam` and the term's options; the
    CAM methods and counterexamples take `alpha` (CE weight; the term gets 1 - alpha);
    counterexamples, masked_images and shuffled_images take their transform's options
    (`threshold`, `value_range`). Methods that draw random numbers (actdiff, actdiff_discriminator,
    sgt, counterexamples, shuffled_images) are called as `loss(classifier, batch, key=key)`;
    actdiff_discriminator also keeps state (`loss.init_state`, `TrainState.loss_state`).
    """
    return preset_table.build(method, options, combine=combine, cross_entropy=cross_entropy, terms=_TERMS,
                              transforms=_TRANSFORMS, partial=functools.partial)


METHODS: Mapping[str, Callable[..., Loss]] = {name: functools.partial(for_method, name) for name in PRESETS}
