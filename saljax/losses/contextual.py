"""CDEP: contextual decomposition explanation penalisation (Rieger, Singh, Murdoch, Yu, ICML 2020).

Contextual decomposition (`saljax.models.decomposition`) splits the logits `z = beta + gamma` into
`beta`, the part due to the input region `A * x`, and `gamma`, the part due to the rest
`(1 - A) * x`. CDEP penalises the share of the logits that the region explains; with `A = 1 - H`
(the region that must NOT matter) the model learns to decide from the rest.

The decomposition is a separate pass of the classifier's `decompose` (set by
`saljax.classifier.from_nnx`) that never updates state, so BatchNorm running statistics still move
once per step, from the loss's ordinary forward pass. In train mode the decomposition normalises with
the batch statistics of the ordinary activation (differentiated, as the forward pass), in eval mode
with the running statistics.
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
    (`has_map` 0) are left out of the mean (0 if no sample has one). Maps `H` (B, H, W) are at the
    image resolution. The classifier must carry `decompose` (`classifier.from_nnx` on a
    `saljax.models` model); a layer without a decomposition rule is refused, naming it.
    """

    def fn(fwd: Forward, batch: Batch) -> Value:
        decompose = fwd.classifier.decompose
        if decompose is None:  # checked by Loss before tracing; kept for direct callers
            raise ValueError("cdep needs a classifier with a contextual decomposition (classifier.from_nnx)")
        region = 1.0 - _common.maps(batch)
        beta, gamma = decompose(fwd.images, region)
        share = jax.nn.sigmoid(_common.as_float(beta) - _common.as_float(gamma))
        per = jnp.mean(share, axis=-1)
        return _common.masked_mean(per, batch_lib.map_weights(batch).astype(per.dtype))

    return Term(name, fn, lam, needs_map=True, needs_decomposition=True)
