"""PyTorch side of test_adversarial.py's parity test (run in the torch interpreter; not a test module).

Usage: python torch_discriminator_side.py DIR LAM LR STEPS. Reads DIR/in.npz (initial discriminator in
saljax's layout, the activations of each step) and writes DIR/reference.npz, from PyTorch's own modules
as ActDiff's authors build the game (spectral_norm'ed nn.Linear + ReLU, nn.Linear + Sigmoid,
nn.BCELoss, torch.optim.Adam, discriminator parameters frozen for the classifier's loss), and
DIR/mirror.npz, from the baseline's functional mirror (`baselines.torch.xil_losses.discriminator_step`).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from baselines.torch import xil_losses


def _layers(arrays):
    return sorted({k.split("/")[1] for k in arrays if k.startswith("params/layer")}, key=lambda n: int(n[5:]))


def reference(arrays, lam, lr, steps):
    names = _layers(arrays)
    modules = []
    for name in names:
        kernel = torch.from_numpy(arrays[f"params/{name}/kernel"])
        linear = nn.utils.spectral_norm(nn.Linear(kernel.shape[0], kernel.shape[1]).double())
        with torch.no_grad():
            linear.weight_orig.copy_(kernel.T)
            linear.bias.copy_(torch.from_numpy(arrays[f"params/{name}/bias"]))
            linear.weight_u.copy_(torch.from_numpy(arrays[f"u/{name}"]))
        modules += [linear, nn.ReLU()]
    out = nn.Linear(arrays["params/out/kernel"].shape[0], 1).double()
    with torch.no_grad():
        out.weight.copy_(torch.from_numpy(arrays["params/out/kernel"]).T)
        out.bias.copy_(torch.from_numpy(arrays["params/out/bias"]))
    disc = nn.Sequential(*modules, out, nn.Sigmoid()).train()
    opt = torch.optim.Adam(disc.parameters(), lr=lr)
    bce = nn.BCELoss()
    values, grads_z, grads_t = [], [], []
    for i in range(steps):
        z = torch.from_numpy(arrays["zs"][i]).requires_grad_(True)
        z_t = torch.from_numpy(arrays["z_ts"][i]).requires_grad_(True)
        ones, zeros = torch.ones(z.shape[0], 1, dtype=z.dtype), torch.zeros(z.shape[0], 1, dtype=z.dtype)
        opt.zero_grad()
        loss_d = (bce(disc(z.detach()), ones) + bce(disc(z_t.detach()), zeros)) * lam
        loss_d.backward()
        opt.step()
        for p in disc.parameters():
            p.requires_grad_(False)
        loss_g = bce(disc(z), zeros) + bce(disc(z_t), ones)
        for p in disc.parameters():
            p.requires_grad_(True)
        g_z, g_t = torch.autograd.grad(loss_g, (z, z_t))
        values.append(loss_g.item()), grads_z.append(g_z.numpy()), grads_t.append(g_t.numpy())
    result = {"values": np.asarray(values), "grads_z": np.stack(grads_z), "grads_t": np.stack(grads_t)}
    for name, linear in zip(names, modules[::2]):
        result[f"params/{name}/kernel"] = linear.weight_orig.detach().numpy().T
        result[f"params/{name}/bias"] = linear.bias.detach().numpy()
        result[f"u/{name}"] = linear.weight_u.numpy()
    result["params/out/kernel"] = out.weight.detach().numpy().T
    result["params/out/bias"] = out.bias.detach().numpy()
    return result


def mirror(arrays, lam, lr, steps):
    names = _layers(arrays) + ["out"]
    params = {n: {p: torch.from_numpy(arrays[f"params/{n}/{p}"]) for p in ("kernel", "bias")} for n in names}
    zeros = {n: {p: torch.zeros_like(v) for p, v in layer.items()} for n, layer in params.items()}
    state = {"params": params, "u": {n: torch.from_numpy(arrays[f"u/{n}"]) for n in names[:-1]},
             "opt_state": {"count": 0, "mu": zeros, "nu": zeros}}
    values, grads_z, grads_t = [], [], []
    for i in range(steps):
        z = torch.from_numpy(arrays["zs"][i]).requires_grad_(True)
        z_t = torch.from_numpy(arrays["z_ts"][i]).requires_grad_(True)
        value, state = xil_losses.discriminator_step(state, z, z_t, torch.ones(z.shape[0], dtype=z.dtype), lam=lam, lr=lr)
        g_z, g_t = torch.autograd.grad(value, (z, z_t))
        values.append(value.item()), grads_z.append(g_z.numpy()), grads_t.append(g_t.numpy())
    result = {"values": np.asarray(values), "grads_z": np.stack(grads_z), "grads_t": np.stack(grads_t)}
    result.update({f"params/{n}/{p}": v.numpy() for n, layer in state["params"].items() for p, v in layer.items()})
    result.update({f"u/{n}": v.numpy() for n, v in state["u"].items()})
    return result


def main():
    directory, lam, lr, steps = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    arrays = dict(np.load(directory / "in.npz"))
    np.savez(directory / "reference.npz", **reference(arrays, lam, lr, steps))
    np.savez(directory / "mirror.npz", **mirror(arrays, lam, lr, steps))


if __name__ == "__main__":
    main()
