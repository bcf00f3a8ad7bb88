"""CDEP: contextual decomposition explanation penalisation (Rieger, Singh, Murdoch, Yu, ICML 2020).

Contextual decomposition (`saljax.models.decomposition`) splits the logits `z = beta + gamma` into
`beta`, the part due to the input region `A * x`, and `gamma`, the part due to the rest
`(1 - A) * x`. CDEP penalises the share of the logits that the region explains; with `A = 1 - H`
(the region that must NOT matter) the model learns to decide from the rest.

Since `beta + gamma` are the logits, the decomposition can serve as the forward pass: in
`combine(cross_entropy(), cdep(lam))` (and with any other term that reads only the logits) the loss
runs ONE pass, the classifier's `decompose_with_state` (set by `saljax.classifier.from_nnx`), takes
the logits as `beta + gamma` and the BatchNorm state from it (running statistics updated once, as
the forward pass would, from the batch statistics of `beta + gamma`). Combined with terms that need
more of the forward pass (input gradients, feature maps: GradMask, RRR, CAM losses...), CDEP runs its
decomposition as a second pass, `decompose`, which never updates state; the running statistics then
move once, from the ordinary forward pass. Both give the same values to rounding. In train mode the
decomposition normalises with the batch statistics of the ordinary activation (differentiated, as
the forward pass), in eval mode with the running statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saljax import batch as batch_lib
from saljax.losses import _common
from saljax.losses.base import Forward, Term, Value

Batch = batch_lib.Batch

__all__ = ["cdep"]


def cdep(lam: float = 1.0, *, name: str = "cdep") -> Term:
    """CDEP (Rieger et al., ICML 2020) in the XIL framework's form (Friedrich et al., NMI 2023).

        (beta, gamma) = CD(f, x, region = A),   A = 1 - H (broadcast over channels)
        term = mean_{n: m_n = 1} mean_c exp(beta_nc) / (exp(beta_nc) + exp(gamma_nc))
             = mean_{n: m_n = 1} mean_c sigmoid(beta_nc - gamma_nc)

    over the logits of ALL K classes, computed stably as the sigmoid. Samples without a map
    (`has_map` 0) are left out of the mean (0 if no sample has one); they still go through the
    decomposition with `A = 1 - H` of whatever map they carry, which only moves the split, not
    `beta + gamma`. Maps `H` (B, H, W) are at the image resolution. The classifier must carry
    `decompose` (`classifier.from_nnx` on a `saljax.models` model); a layer without a decomposition
    rule is refused, naming it. The decomposition is the loss's forward pass when the other terms
    read only the logits (see the module docstring).
    """

    def fn(fwd: Forward, batch: Batch) -> Value:
        parts = fwd.decomposition  # set when the decomposition was the loss's forward pass
        if parts is None:
            decompose = fwd.classifier.decompose
            if decompose is None:  # checked by Loss before tracing; kept for direct callers
                raise ValueError("cdep needs a classifier with a contextual decomposition (classifier.from_nnx)")
            parts = decompose(fwd.images, _region(batch))
        beta, gamma = parts
        share = jax.nn.sigmoid(_common.as_float(beta) - _common.as_float(gamma))
        per = jnp.mean(share, axis=-1)
        return _common.masked_mean(per, batch_lib.map_weights(batch).astype(per.dtype))

    return Term(name, fn, lam, needs_map=True, needs_decomposition=True, region_fn=_region)


def _region(batch: Batch) -> jax.Array:
    """`A = 1 - H` (B, H, W): the region whose contribution CDEP penalises."""
    return 1.0 - _common.maps(batch)
