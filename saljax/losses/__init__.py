"""Saliency-guided losses: cross-entropy plus penalties on input gradients, CAMs, Grad-CAMs or second passes.

A loss is built from weighted terms and compiled as one function:

    loss = combine(cross_entropy(), gradmask(lam=1.0))
    value, aux = loss(classifier, batch)          # classifier: saljax.classifier.Classifier
    value, aux = loss(classifier, batch, key=key) # for terms that draw random numbers

`combine` composes Terms and Losses like `optax.chain` (`combine(for_method("cyborg"), rrr(0.1))`).
One forward pass serves every term, so BatchNorm statistics move once per step (see `base`).
`aux` holds each term's unweighted value (`aux.terms`), the logits and the classifier's new state.

Terms:
- `cross_entropy`           softmax CE, mean (default) or sum over the batch.
- `gradmask`                Simpson et al. 2019: input-gradient saliency outside the lesion mask.
- `rrr`                     Ross et al. 2017: squared input gradients of sum_k log p_k off the map.
- `rbr`                     Shao et al. 2021 (XIL's form): influence-function x input gradients off the map.
- `cyborg`                  Boyd et al. 2023: MSE between min-maxed true-class CAM and the map.
- `dd_difference`, `dd_paired`, `dd_divergence`
                            Divisive Decisions (Piland et al. 2025): true- and false-class CAMs.
- `rrr_g`                   Schramowski et al. 2020: predicted-class Grad-CAM off the map.
- `hint`                    Selvaraju et al. 2019 (XIL's form): true-class Grad-CAM against the map.
- `actdiff`                 Viviano et al. 2021: activations of x and of x with the outside shuffled.
- `actdiff_discriminator`   the same paper's adversarial variant: fool a discriminator of those activations
                            (keeps state: `loss.init_state`, `TrainState.loss_state`).
- `sgt`                     Ismail et al. 2021: KL between x and x with its least salient features noised.
- `transformed_ce`          CE on a transformed copy (counterexamples, Teso and Kersting 2019).
- `cdep`                    Rieger et al. 2020 (XIL's form): share of the logits the region off the map explains.
Batch transforms `(batch, key) -> batch` live in `saljax.losses.transforms`.
`for_method(name, ...)` returns the full loss each paper trains with (defaults: `PRESETS`).
The conventions of every term, with the papers: docs/methods.md in the source tree.
"""

from saljax.losses import transforms
from saljax.losses.adversarial import actdiff_discriminator
from saljax.losses.base import Forward, Loss, LossAux, Term, combine, cross_entropy, term_key
from saljax.losses.cam import cyborg, dd_difference, dd_divergence, dd_paired
from saljax.losses.contextual import cdep
from saljax.losses.gradcam import hint, rrr_g
from saljax.losses.gradient import gradmask, rbr, rrr
from saljax.losses.presets import METHODS, PRESETS, for_method
from saljax.losses.second_pass import actdiff, sgt, transformed_ce
from saljax.losses.transforms import counterexamples, mask_outside, shuffle_outside

__all__ = [
    "Forward",
    "Term",
    "Loss",
    "LossAux",
    "combine",
    "term_key",
    "cross_entropy",
    "gradmask",
    "rrr",
    "rbr",
    "cyborg",
    "dd_difference",
    "dd_paired",
    "dd_divergence",
    "rrr_g",
    "hint",
    "actdiff",
    "actdiff_discriminator",
    "sgt",
    "transformed_ce",
    "cdep",
    "transforms",
    "counterexamples",
    "mask_outside",
    "shuffle_outside",
    "for_method",
    "METHODS",
    "PRESETS",
]
