"""Evaluates loss cases with the PyTorch baseline: `python -m baselines.torch.run IN.npz OUT.npz`.

Runs in the torch interpreter (`$SALJAX_TORCH_PYTHON`, with the repository on PYTHONPATH). Arrays
travel in saljax's layouts (NHWC images, flax paths and kernels); `layout` converts both ways.

IN.npz:
  `spec`                  JSON (a 0-d str array): {"models": {name: {"name": "simple_cnn" | ...,
                          "kwargs": {...}}}, "cases": [{"id", "model", "batch", "dtype",
                          "method", "options", "route", "train"}], "threads": int | null}
  `model/<name>/<path>`   the model's parameters and BatchNorm statistics (flax paths, float64)
  `batch/<name>/<key>`    image (B, H, W, C), label (B,), saliency_map, has_map
  `draws/<id>/uniform/<term>`  saljax's random draws of a case, for the terms that perturb the batch
                          (NHWC for images); merged into that case's batch

OUT.npz, for every case id (the model is loaded afresh for each case, in train mode unless the case
says `"train": false`):
  `case/<id>/loss`, `case/<id>/term/<name>`, `case/<id>/logits`
  `case/<id>/grad/<path>`   d loss / d parameter, flax path and layout
  `case/<id>/state/<path>`  BatchNorm statistics after the step (PyTorch's unbiased running_var)
  `case/<id>/count/<path>`  values per channel N = B*h*w that each BatchNorm saw (path of its module;
                            train mode only, where the running statistics move)
  `case/<id>/error`         the exception, when the case failed (the other cases still run)
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Mapping

import numpy as np
import torch

from baselines.torch import layout, losses, models

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _prefixed(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def build_model(spec: Mapping, weights: Mapping[str, np.ndarray], dtype: torch.dtype) -> models._Classifier:
    """A torch model from its spec and flax-layout weights, in `dtype`, in train mode."""
    model = models.create(spec["name"], **spec.get("kwargs", {}))
    state = layout.to_torch(weights, mlp_feature_shape=getattr(model, "mlp_feature_shape", None))
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if set(state) != expected:
        raise ValueError(f"weights do not match the model: missing {sorted(expected - set(state))},"
                         f" unexpected {sorted(set(state) - expected)}")
    model = model.to(dtype)  # first: load_state_dict copies into the existing dtype
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=False)
    return model.train()


def to_torch_batch(arrays: Mapping[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """saljax batch (NHWC image) -> torch batch (NCHW image, int64 labels, float maps)."""
    batch = {"image": torch.from_numpy(layout.nhwc_to_nchw(arrays["image"])).to(dtype),
             "label": torch.from_numpy(np.asarray(arrays["label"]).astype(np.int64))}
    if "saliency_map" in arrays:
        batch["saliency_map"] = torch.from_numpy(np.asarray(arrays["saliency_map"])).to(dtype)
    if "has_map" in arrays:
        batch["has_map"] = torch.from_numpy(np.asarray(arrays["has_map"]).astype(np.float64)).to(dtype)
    for key, value in arrays.items():  # saljax's random draws: images' draws to NCHW
        if key.startswith("uniform/"):
            value = layout.nhwc_to_nchw(value) if np.ndim(value) == 4 else np.asarray(value)
            batch[key] = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
    return batch


def run_case(model: models._Classifier, batch: Mapping[str, torch.Tensor], method: str,
             options: Mapping, route: str = "eager") -> dict[str, np.ndarray]:
    """Loss, terms, logits, parameter gradients and BatchNorm state after one train-mode pass.

    route "eager": autograd as the authors (`autograd.grad(..., create_graph=True)`, `backward`);
    "func": `torch.func` (functional_call, vjp, grad), without BatchNorm running statistics (see
    `losses.Loss.functional`), so no `state/` or `count/` entries.
    """
    if route == "func":
        return _run_func(model, batch, losses.for_method(method, **options))
    if route != "eager":
        raise ValueError(f"route must be 'eager' or 'func'; got {route!r}")
    counts: dict[str, int] = {}

    def count(module_name: str):
        def hook(_module, inputs):
            x = inputs[0]
            counts[module_name] = x.numel() // x.shape[1]
        return hook

    handles = [m.register_forward_pre_hook(count(n)) for n in model.norm_modules
               for m in [model.get_submodule(n)] if model.training]
    try:
        loss = losses.for_method(method, **options)
        model.zero_grad(set_to_none=True)
        total, terms, logits = loss(model, batch)
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    norm_modules = model.norm_modules
    shape = getattr(model, "mlp_feature_shape", None)
    grad_arrays = {n: (g if g is not None else torch.zeros_like(params[n])).detach().numpy()
                   for n, g in zip(params, grads)}
    buffers = {n: b.detach().numpy() for n, b in model.named_buffers()}
    out = {"loss": total.detach().numpy(), "logits": logits.detach().numpy()}
    out.update({f"term/{k}": v.detach().numpy() for k, v in terms.items()})
    out.update({f"grad/{k}": v for k, v in layout.from_torch(grad_arrays, norm_modules=norm_modules,
                                                              mlp_feature_shape=shape).items()})
    out.update({f"state/{k}": v for k, v in layout.from_torch(buffers, norm_modules=norm_modules).items()})
    out.update({f"count/{n.replace('.', layout.SEP)}": np.asarray(c) for n, c in counts.items()})
    return out


def _run_func(model: models._Classifier, batch: Mapping[str, torch.Tensor], loss: losses.Loss) -> dict[str, np.ndarray]:
    norm_modules = model.norm_modules
    torch.func.replace_all_batch_norm_modules_(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_of(p):
        total, terms, logits = loss.functional(model, {**p, **buffers}, batch)
        return total, (total, terms, logits)

    grads, (total, terms, logits) = torch.func.grad(loss_of, has_aux=True)(params)
    out = {"loss": total.detach().numpy(), "logits": logits.detach().numpy()}
    out.update({f"term/{k}": v.detach().numpy() for k, v in terms.items()})
    grad_arrays = {k: v.detach().numpy() for k, v in grads.items()}
    out.update({f"grad/{k}": v for k, v in layout.from_torch(
        grad_arrays, norm_modules=norm_modules, mlp_feature_shape=getattr(model, "mlp_feature_shape", None)).items()})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m baselines.torch.run IN.npz OUT.npz", file=sys.stderr)
        return 2
    with np.load(argv[0], allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    spec = json.loads(str(arrays.pop("spec")))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    out: dict[str, np.ndarray] = {"torch_version": np.asarray(torch.__version__)}
    for case in spec["cases"]:
        prefix = f"case/{case['id']}/"
        try:
            dtype = _DTYPES[case["dtype"]]
            model = build_model(spec["models"][case["model"]], _prefixed(arrays, f"model/{case['model']}/"), dtype)
            draws = _prefixed(arrays, f"draws/{case['id']}/")  # this case's random draws, if any
            batch = to_torch_batch({**_prefixed(arrays, f"batch/{case['batch']}/"), **draws}, dtype)
            model.train(bool(case.get("train", True)))
            result = run_case(model, batch, case["method"], case.get("options", {}), case.get("route", "eager"))
            out.update({prefix + k: v for k, v in result.items()})
        except Exception:  # reported per case, so one failure does not hide the others
            out[prefix + "error"] = np.asarray(traceback.format_exc())
    np.savez(argv[1], **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
