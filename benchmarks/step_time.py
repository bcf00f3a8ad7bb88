"""Step time of every saliency-guided loss relative to the plain cross-entropy step.

Times the jit-compiled train step (`saljax.train.make_train_step`) of CE, GradMask, RRR, CYBORG
and the three Divisive Decisions losses on the same model and batch. Steps of the different losses
alternate (CE, GradMask, ..., CE, GradMask, ...) so that a load change on a shared machine hits
all alike; the table reports medians after warm-up and each loss's ratio to the CE step.

    python benchmarks/step_time.py                      # this machine's defaults, table to stdout
    python benchmarks/step_time.py --write benchmarks/STEP_TIME.md

`--devices N` splits the batch over N devices (on CPU: N XLA host devices, set before JAX starts);
`--sweep-devices 1,2,4` runs one subprocess per count and compares their CE and GradMask steps.
`--conv both` also times every loss on the same model built with `conv_impl="xla"` (every
convolution as `lax.conv_general_dilated`, what `conv_impl="auto"` uses off CPU and for stride 1),
interleaved with the default steps, and adds that form's ratios and the speed-up of saljax's CPU
form over it. `--op-profile rbr,cdep` adds, for those losses and CE, XLA's FLOP and byte counts per
step (its cost analysis of the compiled step) and the time per XLA op kind over 3 steps (a
jax.profiler trace, threads summed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _machine import describe

LOSSES = ("ce", "gradmask", "rrr", "cyborg", "dd_difference", "dd_paired", "dd_divergence")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="saljax.models name (default resnet18)")
    p.add_argument("--width", type=int, default=16, help="ResNet base width (default 16)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (each runs every loss once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--devices", type=int, default=None, help="split the batch over N devices (CPU: host devices)")
    p.add_argument("--sweep-devices", default=None, help="comma-separated device counts, one subprocess each")
    p.add_argument("--conv", default="saljax", choices=("saljax", "both"),
                   help="'both': also time each loss with lax.conv_general_dilated for every conv")
    p.add_argument("--op-profile", default=None, help="comma-separated losses: XLA cost analysis and op profile")
    p.add_argument("--json", action="store_true", help="print one JSON object (used by --sweep-devices)")
    p.add_argument("--write", default=None, help="also write the Markdown table to this file")
    return p.parse_args(argv)


def measure(args) -> dict:
    if args.devices:
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from saljax import losses, models, parallel, train

    kwargs = {"width": args.width} if args.model.startswith("resnet") else {}

    def build(**extra):
        return models.create(args.model, num_classes=2, in_channels=args.channels, rngs=nnx.Rngs(0),
                             input_size=(args.image_size, args.image_size), dtype=jnp.dtype(args.dtype), **kwargs, **extra)

    model = build()
    optimizer = optax.sgd(1e-3, momentum=0.9)
    model_def, state0 = train.init_train_state(model, optimizer)
    mesh = parallel.make_mesh(args.devices) if args.devices else None
    rng = np.random.default_rng(0)
    b, s = args.batch_size, args.image_size
    batch = {
        "image": rng.normal(size=(b, s, s, args.channels)).astype(np.float32),
        "label": (np.arange(b) % 2).astype(np.int32),
        "saliency_map": (rng.uniform(size=(b, s, s)) > 0.5).astype(np.float32),
        "has_map": np.ones(b, bool),
    }
    if mesh is not None:
        batch = parallel.shard_batch(batch, mesh)
        state0 = parallel.replicate(state0, mesh)
    # Step names are "<loss>" for saljax's models and "<loss>@lax" for the lax-conv variant.
    defs = {"": model_def}
    if args.conv == "both":
        # The same model (same seed: same parameters) with conv_impl='xla': every convolution as
        # lax.conv_general_dilated; only the graph definition differs.
        lax_def, lax_state = train.init_train_state(build(conv_impl="xla"), optimizer)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(lax_state), jax.device_get(state0))
        defs["@lax"] = lax_def
    names = [loss + variant for loss in args.losses.split(",") for variant in defs]
    steps, states = {}, {}
    for name in names:
        loss, variant = _split_name(name)
        steps[name] = train.make_train_step(defs[variant], losses.for_method(loss), optimizer, mesh=mesh)
        states[name] = jax.tree.map(jnp.copy, state0)
        start = time.perf_counter()
        for _ in range(args.warmup):
            states[name], out = steps[name](states[name], batch)
        jax.block_until_ready(out)
        steps[name + "/compile_s"] = time.perf_counter() - start
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            start = time.perf_counter()
            states[name], out = steps[name](states[name], batch)
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    profiles = {}
    wanted = args.op_profile.split(",") if args.op_profile else []
    for name in (["ce"] if wanted and "ce" in names else []) + wanted:
        profiles[name] = _op_profile(steps[name], states, name, batch, with_ops=name != "ce")
        states[name] = profiles[name].pop("state")
    return {
        "profiles": profiles,
        "medians_ms": {k: 1e3 * v for k, v in medians.items()},
        # Each loss against the CE step with the same convolutions.
        "ratio_to_ce": {k: v / medians["ce" + _split_name(k)[1]] for k, v in medians.items()}
        if "ce" in medians else {},
        "compile_s": {name: steps[name + "/compile_s"] for name in names},
        "devices": args.devices or 1,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def _op_profile(step, states: dict, name: str, batch: dict, *, with_ops: bool) -> dict:
    """XLA's FLOP and byte counts of the compiled step and, `with_ops`, time per op kind over 3 steps."""
    import jax
    from _xla_profile import cost_analysis, op_times

    analysis = cost_analysis(step, states[name], batch)
    out = {"gflop": analysis.get("flops", 0.0) / 1e9, "gbytes": analysis.get("bytes accessed", 0.0) / 1e9}
    holder = {"state": states[name]}
    if with_ops:

        def run() -> None:
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready(metrics)

        out["ops"] = op_times(run)
    out["state"] = holder["state"]
    return out


def _split_name(name: str) -> tuple[str, str]:
    """"gradmask@lax" -> ("gradmask", "@lax"); "gradmask" -> ("gradmask", "")."""
    loss, at, variant = name.partition("@")
    return loss, at + variant


def table(args, result: dict) -> str:
    targets = {"gradmask": 2.2, "rrr": 2.2, "cyborg": 1.1, "dd_difference": 1.1, "dd_paired": 1.1, "dd_divergence": 1.1}
    lines = [
        f"Model {args.model}{f' (width {args.width})' if args.model.startswith('resnet') else ''}, "
        f"{args.image_size}x{args.image_size}x{args.channels}, "
        f"batch {args.batch_size}, {args.dtype}, {result['devices']} device(s), backend {result['backend']}, "
        f"jax {result['jax']}; median of {args.repeats} alternated rounds after {args.warmup} warm-up steps.",
        "",
    ]
    medians = result["medians_ms"]
    both = any("@" in name for name in medians)
    if both:
        lines[0] += (" `@lax`: every convolution as `lax.conv_general_dilated`; ratios are to the CE step"
                     " with the same convolutions; speed-up = `@lax` step / saljax step.")
    lines += ["| loss | step (ms) | ratio to CE | target | compile (s) |" + (" speed-up |" if both else ""),
              "|---|---|---|---|---|" + ("---|" if both else "")]
    for name, ms in medians.items():
        ratio = result["ratio_to_ce"].get(name, float("nan"))
        target = None if "@" in name else targets.get(name)
        verdict = "" if target is None else (f"<= {target} " + ("met" if ratio <= target else "MISSED"))
        row = f"| {name} | {ms:.1f} | {ratio:.2f} | {verdict} | {result['compile_s'][name]:.1f} |"
        if both:
            other = medians.get(name + "@lax")
            row += f" {other / ms:.2f}x |" if other else " |"
        lines.append(row)
    profiles = result.get("profiles", {})
    if profiles:
        ce = profiles.get("ce", {})
        lines += ["", "XLA's cost analysis of the compiled step:", "",
                  "| loss | GFLOP per step | GB accessed | FLOP ratio to CE |", "|---|---|---|---|"]
        for name, prof in profiles.items():
            ratio = f"{prof['gflop'] / ce['gflop']:.2f}" if ce.get("gflop") else "-"
            lines.append(f"| {name} | {prof['gflop']:.2f} | {prof['gbytes']:.2f} | {ratio} |")
        for name, prof in profiles.items():
            if not prof.get("ops"):
                continue
            total = sum(ms for _, ms, _ in prof["ops"]) or 1.0
            lines += ["", f"jax.profiler, {name}, 3 steps (time per XLA op kind, numbering stripped, threads summed):", "", "```",
                      f"{'XLA op':<44}{'share':>8}{'total ms':>12}{'calls':>8}"]
            lines += [f"{kind[:43]:<44}{ms / total:>8.1%}{ms:>12.1f}{n:>8}" for kind, ms, n in prof["ops"][:15]]
            lines += [f"{'all ops':<44}{'':>8}{total:>12.1f}", "```"]
    return "\n".join(lines)


def sweep(args) -> str:
    rows = ["| devices | CE step (ms) | GradMask step (ms) | GradMask / CE | CE speed-up vs 1 device |",
            "|---|---|---|---|---|"]
    base = None
    for n in [int(x) for x in args.sweep_devices.split(",")]:
        cmd = [sys.executable, __file__, "--json", "--devices", str(n), "--losses", "ce,gradmask",
               "--model", args.model, "--width", str(args.width), "--image-size", str(args.image_size),
               "--channels", str(args.channels), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        ce, gm = out["medians_ms"]["ce"], out["medians_ms"]["gradmask"]
        base = base or ce
        rows.append(f"| {n} | {ce:.1f} | {gm:.1f} | {gm / ce:.2f} | {base / ce:.2f}x |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.sweep_devices:
        text = sweep(args)
    else:
        result = measure(args)
        if args.json:
            print(json.dumps(result))
            return 0
        text = table(args, result)
    text = f"Machine: {describe()}. Command: `{command.strip()}`\n\n{text}\n"
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
