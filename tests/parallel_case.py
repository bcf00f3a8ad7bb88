"""The training case shared by the data-parallel tests: a few GradMask steps of a BatchNorm CNN."""

import jax
import numpy as np
import optax
from flax import nnx

from saljax import demo, losses, models, parallel, train

GLOBAL_BATCH = 16
STEPS = 3


def run_steps(mesh, rows=slice(None)):
    """Trains STEPS steps on the same global batches; this process feeds `rows` of each.

    Returns (losses per step, {parameter path: value}) for comparison across device counts.
    """
    data = demo.toy_decoy_set(GLOBAL_BATCH * STEPS, seed=3, decoy_follows_label=True)
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4, 4), rngs=nnx.Rngs(0))
    optimizer = optax.sgd(0.1)
    model_def, state = train.init_train_state(model, optimizer)
    step = train.make_train_step(model_def, losses.for_method("gradmask", lam=1.0, reduction="mean"), optimizer,
                                 mesh=mesh)
    state = parallel.replicate(state, mesh)
    values = []
    for i in range(STEPS):
        batch = {k: v[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH][rows] for k, v in data.items()}
        state, out = step(state, parallel.shard_batch(batch, mesh))
        values.append(float(out["loss"]))
    flat = {jax.tree_util.keystr(p): np.asarray(jax.device_get(v))
            for p, v in jax.tree_util.tree_leaves_with_path((state.params, state.model_state))}
    return values, flat
