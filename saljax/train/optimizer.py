"""Optimizers and learning-rate schedules of a training config, built from optax.

`make_optimizer(config.optimizer, num_steps=config.num_steps)` reads these fields (defaults in
`saljax.config.defaults()`):

    name            adam | adamw | sgd | lamb | lars
    learning_rate   the base (peak) learning rate
    momentum        sgd (0: plain SGD) and lars
    nesterov        sgd (with momentum > 0) and lars
    weight_decay    adam, sgd: L2, `weight_decay * param` added to the gradient before the update,
                    as PyTorch's `weight_decay` argument of Adam and SGD does (Adam then rescales
                    it). adamw, lamb, lars: decoupled weight decay, applied to the update outside
                    the adaptive scaling (Loshchilov & Hutter, ICLR 2019; You et al., ICLR 2020;
                    You, Gitman & Ginsburg, 2017), as optax implements them.
    schedule        constant | step | cosine | warmup_cosine
    decay_every     step: steps between decays (staircase)
    decay_factor    step: factor of each decay
    warmup_steps    warmup_cosine: steps of linear warmup from 0 to learning_rate
    decay_steps     cosine, warmup_cosine: length of the schedule in steps, warmup included (0: the
                    run's num_steps)
    end_factor      cosine, warmup_cosine: final learning rate as a fraction of learning_rate
    clip_norm       clip the gradient to this global norm before anything else (0: off)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_optimizer", "make_schedule"]

OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "lars")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")


def _field(config: Mapping[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {' | '.join(allowed)}; got {value!r}")
    return value


def _non_negative(field: str, value: Any, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (kind is int and value != int(value)):
        raise ValueError(f"{field} must be a non-negative {kind.__name__}; got {value!r}")
    return kind(value)


def make_schedule(config: Mapping[str, Any], *, num_steps: int | None = None) -> optax.Schedule | float:
    """The learning rate of `config` (the optimizer section): a float or an optax schedule.

    Configs written before `schedule` existed mean "step" when `decay_every` > 0.
    """
    lr = _non_negative("optimizer.learning_rate", _field(config, "learning_rate", 1e-3))
    decay_every = _non_negative("optimizer.decay_every", _field(config, "decay_every", 0), int)
    default = "step" if decay_every and "schedule" not in config else "constant"
    schedule = _choice("optimizer.schedule", _field(config, "schedule", default), SCHEDULES)
    if schedule == "constant":
        if decay_every:
            raise ValueError("optimizer.decay_every is set but optimizer.schedule is 'constant'; set optimizer.schedule='step'")
        return lr
    if schedule == "step":
        if not decay_every:
            raise ValueError("optimizer.schedule='step' needs optimizer.decay_every >= 1")
        factor = _non_negative("optimizer.decay_factor", _field(config, "decay_factor", 0.1))
        return optax.exponential_decay(lr, decay_every, factor, staircase=True)
    decay_steps = _non_negative("optimizer.decay_steps", _field(config, "decay_steps", 0), int) or num_steps
    if not decay_steps:
        raise ValueError(f"optimizer.schedule={schedule!r} needs optimizer.decay_steps >= 1 (or the run's num_steps)")
    end_factor = _non_negative("optimizer.end_factor", _field(config, "end_factor", 0.0))
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
    warmup = _non_negative("optimizer.warmup_steps", _field(config, "warmup_steps", 0), int)
    if warmup >= decay_steps:
        raise ValueError(f"optimizer.warmup_steps ({warmup}) must be smaller than the schedule's decay_steps ({decay_steps})")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, end_value=lr * end_factor)


def make_optimizer(config: Mapping[str, Any], *, num_steps: int | None = None) -> optax.GradientTransformation:
    """The optax optimizer that `config` (the `optimizer` section of a training config) describes.

    Gradient clipping (`clip_norm`) comes first, then L2 weight decay (adam, sgd), then the
    optimizer with its schedule. `num_steps` is the default length of the cosine schedules.
    Raises a one-line ValueError naming the field for an unknown name or an invalid value.
    """
    name = _choice("optimizer.name", _field(config, "name", "adam"), OPTIMIZERS)
    lr = make_schedule(config, num_steps=num_steps)
    wd = _non_negative("optimizer.weight_decay", _field(config, "weight_decay", 0.0))
    clip = _non_negative("optimizer.clip_norm", _field(config, "clip_norm", 0.0))
    momentum = _non_negative("optimizer.momentum", _field(config, "momentum", 0.9))
    nesterov = bool(_field(config, "nesterov", False))
    parts = [optax.clip_by_global_norm(clip)] if clip else []
    if name in ("adam", "sgd") and wd:
        # L2 on the gradient, as PyTorch's Adam(weight_decay=) and SGD(weight_decay=).
        parts.append(optax.add_decayed_weights(wd))
    if name == "adam":
        parts.append(optax.adam(lr))
    elif name == "sgd":
        if nesterov and not momentum:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        parts.append(optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    elif name == "adamw":
        parts.append(optax.adamw(lr, weight_decay=wd))
    elif name == "lamb":
        parts.append(optax.lamb(lr, weight_decay=wd))
    else:
        parts.append(optax.lars(lr, weight_decay=wd, momentum=momentum, nesterov=nesterov))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)
