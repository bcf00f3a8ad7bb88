"""Seeds as one vmapped program against the same seeds one after another: seconds per seed-step and memory.

For each model (SimpleCNN as in the decoy_digits suite, ResNet-18 of width 16), loss (CE,
GradMask) and N seeds, times one step of `saljax.train.make_many_train_step` (N stacked states,
one batch per seed: what `saljax experiment` and `train_many` run) against N steps of the single
run's `make_train_step` (N states stepped one after another with one compiled program: what
separate runs cost once compiled). Measurements alternate (vmapped N=1, sequential N=1, vmapped
N=2, ...) round by round, so a load change on a shared machine hits all alike; the table gives
medians after warm-up. Batches are fixed device arrays: the data pipeline is not timed.

Memory: XLA's memory analysis of each compiled step (arguments + outputs - donated/aliased +
temporaries, in MiB), on every backend; for the sequential runs, N states plus one step's
program. On backends with `memory_stats()` (GPU), also the device's peak bytes in use over the
whole benchmark; on CPU the process's max RSS over the whole benchmark instead.

    python benchmarks/many_seeds.py                            # default backend; table to stdout
    python benchmarks/many_seeds.py --write benchmarks/MANY_SEEDS.md
    python benchmarks/many_seeds.py --device gpu --seeds 1,2,5,10,20
    python benchmarks/many_seeds.py --form map          # the runs one after another inside the program
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

from _machine import commit, describe

MODELS = {
    # name: (saljax model, kwargs, image size, channels, classes): the suites' shapes
    "simple_cnn": ("simple_cnn", {}, 32, 1, 10),
    "resnet18_w16": ("resnet18", {"width": 16}, 32, 3, 2),
    # the red_herring suite's model at the paper's width (3x3 stride-1 stem, 28x28x1; batch 16 there)
    "resnet18_red_herring": ("resnet18", {"width": 64, "stem": "cifar"}, 28, 1, 2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, choices=("cpu", "gpu", "tpu"),  # gpu: NVIDIA (CUDA)
                   help="JAX platform (default: JAX's default backend)")
    p.add_argument("--models", default="simple_cnn,resnet18_w16", help=f"comma-separated, of {list(MODELS)}")
    p.add_argument("--losses", default="ce,gradmask")
    p.add_argument("--seeds", default="1,2,5,10", help="comma-separated numbers of seeds")
    p.add_argument("--form", default="vmap", choices=("vmap", "map"),
                   help="how the one program steps its seeds: vmap (batched, default) or map (lax.map, one after another)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each program after compiling")
    p.add_argument("--write", default=None, help="also write the Markdown page to this file")
    return p.parse_args(argv)


def _program_mib(compiled) -> float:
    """Peak bytes of a compiled program by XLA's memory analysis, in MiB (nan where unavailable)."""
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    except (AttributeError, NotImplementedError, TypeError):
        return float("nan")
    return total / 2**20


def measure(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from saljax import losses, models, train

    seeds = [int(n) for n in args.seeds.split(",")]
    optimizer = optax.sgd(1e-3, momentum=0.9)
    rows = []
    for model_name in args.models.split(","):
        name, kwargs, size, channels, classes = MODELS[model_name]

        def init(seed, name=name, kwargs=kwargs, size=size, channels=channels, classes=classes):
            model = models.create(name, num_classes=classes, in_channels=channels, rngs=nnx.Rngs(seed),
                                  input_size=(size, size), **kwargs)
            return train.init_train_state(model, optimizer)

        model_def, _ = init(0)
        states = [init(s)[1] for s in range(max(seeds))]
        rng = np.random.default_rng(0)
        b = args.batch_size
        batches = [{
            "image": jnp.asarray(rng.normal(size=(b, size, size, channels)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, classes, b), jnp.int32),
            "saliency_map": jnp.asarray(rng.uniform(size=(b, size, size)) > 0.5, jnp.float32),
            "has_map": jnp.ones(b, bool),
        } for _ in range(max(seeds))]
        state_mib = sum(x.nbytes for x in jax.tree.leaves(states[0])) / 2**20
        for loss_name in args.losses.split(","):
            loss = losses.for_method(loss_name)
            single = train.make_train_step(model_def, loss, optimizer)
            many = train.make_many_train_step(model_def, lambda _, loss=loss: loss, optimizer, form=args.form)
            programs = {}
            start = time.perf_counter()
            compiled_single = single.lower(states[0], batches[0]).compile()
            programs[("sequential", 0)] = {"compile_s": time.perf_counter() - start, "mib": _program_mib(compiled_single)}
            live = {}
            for n in seeds:
                keys = jnp.stack([jax.random.key(s) for s in range(n)])
                values = jnp.zeros(n, jnp.float32)
                stacked = jax.tree.map(lambda *x: jnp.stack(x), *states[:n])
                batch = jax.tree.map(lambda *x: jnp.stack(x), *batches[:n])
                start = time.perf_counter()
                compiled = many.lower(stacked, batch, keys, values).compile()
                programs[("vmapped", n)] = {"compile_s": time.perf_counter() - start, "mib": _program_mib(compiled)}
                live[("vmapped", n)] = [compiled, stacked, batch, keys, values]
                live[("sequential", n)] = [compiled_single, [jax.tree.map(jnp.copy, s) for s in states[:n]]]

            def run(kind, n, live=live, batches=batches):
                entry = live[(kind, n)]
                if kind == "vmapped":
                    compiled, stacked, batch, keys, values = entry
                    entry[1], out = compiled(stacked, batch, keys, values)
                else:
                    compiled, own = entry
                    for i in range(n):
                        own[i], out = compiled(own[i], batches[i])
                jax.block_until_ready(out)

            for kind_n in live:
                for _ in range(args.warmup):
                    run(*kind_n)
            times = {kind_n: [] for kind_n in live}
            cpu = {kind_n: [] for kind_n in live}
            for _ in range(args.repeats):
                for n in seeds:  # alternate: vmapped N, sequential N, vmapped next N, ...
                    for kind in ("vmapped", "sequential"):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        run(kind, n)
                        times[(kind, n)].append(time.perf_counter() - start)
                        cpu[(kind, n)].append(time.process_time() - start_cpu)
            for n in seeds:
                vm = statistics.median(times[("vmapped", n)]) / n
                sq = statistics.median(times[("sequential", n)]) / n
                vm_cpu = statistics.median(cpu[("vmapped", n)]) / n
                sq_cpu = statistics.median(cpu[("sequential", n)]) / n
                rows.append({
                    "model": model_name, "loss": loss_name, "seeds": n, "vmapped_s": vm, "sequential_s": sq,
                    "speedup": sq / vm, "vmapped_cpu_s": vm_cpu, "sequential_cpu_s": sq_cpu,
                    "cpu_speedup": sq_cpu / vm_cpu, "vmapped_mib": programs[("vmapped", n)]["mib"],
                    "sequential_mib": (n - 1) * state_mib + programs[("sequential", 0)]["mib"],
                    "compile_vmapped_s": programs[("vmapped", n)]["compile_s"],
                    "compile_single_s": programs[("sequential", 0)]["compile_s"],
                })
                r = rows[-1]
                print(f"{model_name} {loss_name} N={n}: vmapped {1e3 * vm:.1f} ms/seed-step, sequential "
                      f"{1e3 * sq:.1f} ms/seed-step, speed-up {r['speedup']:.2f}x (CPU time {r['cpu_speedup']:.2f}x)", flush=True)
            live.clear()
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        peak = f"device peak bytes in use over the whole benchmark: {stats['peak_bytes_in_use'] / 2**20:.0f} MiB"
    else:
        # ru_maxrss is in KiB on Linux
        peak = f"process max RSS over the whole benchmark: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"
    return {"rows": rows, "peak": peak, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__}


def _targets(row) -> str:
    if row["seeds"] != 5 and not (row["model"] == "resnet18_w16" and row["seeds"] > 1):
        return ""
    if row["model"] == "simple_cnn":
        return ">= 2x " + ("met" if row["speedup"] >= 2.0 else "MISSED")
    return ">= 1x " + ("met" if row["speedup"] >= 1.0 else "MISSED")


def table(args, result: dict) -> str:
    lines = [
        f"Backend {result['backend']} ({result['device']}), jax {result['jax']}, form {args.form} "
        f"(`make_many_train_step(form={args.form!r})`), batch {args.batch_size} per seed, "
        f"float32, SGD with momentum; median of {args.repeats} alternated rounds after {args.warmup} warm-up step(s). "
        "Seconds per seed-step: a step's wall time divided by its seeds. Memory: XLA's memory analysis of the "
        "compiled vmapped step; sequential = N-1 more states + the single step's program. "
        f"{result['peak'][0].upper() + result['peak'][1:]}. CPU-time speed-up: the same ratio of process CPU"
        " seconds (all threads), less sensitive to other processes' load than wall time.",
        "",
        "| model | loss | seeds | vmapped (ms/seed-step) | sequential (ms/seed-step) | speed-up | target |"
        " CPU-time speed-up | vmapped memory (MiB) | sequential memory (MiB) | compile vmapped / single (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['loss']} | {r['seeds']} | {1e3 * r['vmapped_s']:.1f} | "
                     f"{1e3 * r['sequential_s']:.1f} | {r['speedup']:.2f}x | {_targets(r)} | {r['cpu_speedup']:.2f}x | "
                     f"{r['vmapped_mib']:.1f} | "
                     f"{r['sequential_mib']:.1f} | {r['compile_vmapped_s']:.1f} / {r['compile_single_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device:  # before JAX starts; JAX names NVIDIA GPUs' platform "cuda" ("gpu" fails on jax 0.11)
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(args.device, args.device)
    command = "python benchmarks/many_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = measure(args)
    text = (f"Machine: {describe()}. Command: `{command.strip()}` at commit {commit()}.\n\n"
            f"{table(args, result)}\n")
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
