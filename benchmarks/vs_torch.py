#!/usr/bin/env python
"""Train-step time of saljax against PyTorch, per saliency-guided loss.

    .venv/bin/python benchmarks/vs_torch.py                       # CPU table, writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/vs_torch.py --device gpu          # ResNet-50, 224 px, batch 64, fp32 + bf16
    .venv/bin/python benchmarks/vs_torch.py --models simple_cnn --losses ce,gradmask --reps 3 --out -
    .venv/bin/python benchmarks/vs_torch.py --losses methods --frameworks saljax,torch_eager,torch_compile
                                                                  # the comparison methods and CDEP

Frameworks, each in its own process (so that each has its own peak memory and no framework's
threads or caches disturb another's):
  saljax              `saljax.train.make_train_step` (one jitted step: loss, gradients, SGD update)
  torch_eager         baselines.torch: `autograd.grad(..., create_graph=True)`, `backward()`, SGD
  torch_compile       the same loss under `torch.compile`, `backward()`, SGD
  torch_func_compile  the loss through torch.func (functional_call, vjp, grad) under `torch.compile`;
                      BatchNorm keeps no running statistics on this route (torch.func forbids the
                      in-place update), the only work it leaves out

Same model, batch, dtype, SGD (lr 0.01, momentum 0.9) and number of CPU threads everywhere: every
process is pinned to the same `--threads` cores and torch uses that many threads. The processes
stay alive; timed runs alternate between them (A B C A B C ...), each `--steps` steps, `--reps`
times, and the medians over all timed steps are reported, so that load from other processes on a
shared machine hits every framework alike. PyTorch's processes get `OMP_WAIT_POLICY=PASSIVE` (unless
set): on a loaded machine spinning OpenMP threads made PyTorch's steps 10x slower. Peak memory:
`ru_maxrss` of each process (and the peak of the device allocator on GPU). Where saljax is slower,
the report adds phase timings and op profiles (jax.profiler, torch.profiler) of both.

`--worker` runs one framework's process; the driver starts those itself. PyTorch runs in the
interpreter of `--torch-python` (default `$SALJAX_TORCH_PYTHON`), this script and saljax in this one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("saljax", "torch_eager", "torch_compile", "torch_func_compile")
LOSSES = ("ce", "gradmask", "rrr", "cyborg", "dd_difference", "dd_paired", "dd_divergence")
# The field's comparison methods and CDEP (`--losses methods`). PyTorch's losses for them run on the
# eager graph only (autograd.grad on it, second passes, the decomposition reading the modules), so
# torch.func has no route for them.
METHOD_LOSSES = ("actdiff", "rrr_g", "hint", "rbr", "sgt", "counterexamples", "cdep")
# Random draws of the methods that perturb the batch: (term name, shape: "image" or "pixels"). saljax
# draws them in its jitted step; PyTorch's losses read them from the batch, drawn anew every step
# (torch.rand), as the authors' code draws them.
DRAWS = {"actdiff": [("actdiff", "pixels")], "sgt": [("sgt", "image")],
         "counterexamples": [("ce_transformed", "image")]}
INPUT_GRADIENT_LOSSES = ("gradmask", "gradmask_midl", "rrr")
PRESETS = {
    # model, image size, batch, model kwargs, dtypes
    "cpu": {"models": ("simple_cnn", "resnet18"), "size": 32, "batch": 32, "width": 16, "dtypes": ("float32",)},
    "gpu": {"models": ("resnet50",), "size": 224, "batch": 64, "width": 64, "dtypes": ("float32", "bfloat16")},
}
LR, MOMENTUM = 0.01, 0.9


def model_kwargs(name: str, width: int) -> dict[str, Any]:
    """Constructor arguments shared by saljax.models and baselines.torch.models."""
    if name == "simple_cnn":
        return {"num_classes": 2, "in_channels": 3}  # GradMask's channels (64, 32, 16, 8)
    return {"num_classes": 2, "in_channels": 3, "width": width}


def make_batch(cfg: dict[str, Any]):
    """numpy batch, saljax layout: image (B, H, W, 3) normal, labels 0/1, maps uniform in [0, 1]."""
    import numpy as np

    rng = np.random.default_rng(0)
    b, s = cfg["batch"], cfg["size"]
    return {
        "image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
        "label": (np.arange(b) % 2).astype(np.int32),
        "saliency_map": rng.uniform(size=(b, s, s)).astype(np.float32),
        "has_map": np.ones(b, np.float32),
    }


# --- workers: one framework each, driven over stdin/stdout ------------------------------------------------


class Step:
    """A framework's train step: `run()` makes one synchronised step; `phases` for the profile."""

    def __init__(self, run: Callable[[], None], phases: dict[str, Callable[[], None]] | None = None,
                 memory: Callable[[], float | None] = lambda: None, op_profile: Callable[[], str] | None = None,
                 flops: Callable[[], float | None] = lambda: None):
        self.run, self.phases, self.memory, self.op_profile, self.flops = run, phases or {}, memory, op_profile, flops


def saljax_step(cfg: dict[str, Any]) -> Step:
    import jax
    import jax.numpy as jnp
    import optax
    from _xla_profile import cost_analysis, op_times  # imports jax: only in the saljax worker
    from flax import nnx

    from saljax import classifier, losses, models, train

    if cfg["device"] == "gpu":
        jax.config.update("jax_default_device", jax.devices("gpu")[0])
    dtype = jnp.bfloat16 if cfg["dtype"] == "bfloat16" else jnp.float32
    model = models.create(cfg["model"], rngs=nnx.Rngs(0), dtype=dtype, **model_kwargs(cfg["model"], cfg["width"]))
    optimizer = optax.sgd(LR, momentum=MOMENTUM)
    model_def, state = train.init_train_state(model, optimizer)
    loss = losses.for_method(cfg["loss"])
    step = train.make_train_step(model_def, loss, optimizer)
    batch = {k: jnp.asarray(v) for k, v in make_batch(cfg).items()}
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    def clf(params, model_state):
        return classifier.from_nnx(model_def.train, params, model_state)

    key = {"key": jax.random.key(0)} if loss.needs_key else {}
    forward = jax.jit(lambda p, s, x: clf(p, s)(x))
    value = jax.jit(lambda p, s, b: loss(clf(p, s), b, **key)[0])
    grads = jax.jit(jax.grad(lambda p, s, b: loss(clf(p, s), b, **key)[0]))

    def phase(fn: Callable, *args) -> Callable[[], None]:
        return lambda: jax.block_until_ready(fn(*args))

    def current():
        return holder["state"].params, holder["state"].model_state

    phases = {
        "forward": lambda: phase(forward, *current(), batch["image"])(),
        "loss": lambda: phase(value, *current(), batch)(),
        "loss+grad": lambda: phase(grads, *current(), batch)(),
        "step": run,
    }

    def memory() -> float | None:
        stats = jax.devices()[0].memory_stats() if cfg["device"] == "gpu" else None
        return stats["peak_bytes_in_use"] / 2**20 if stats else None

    def flops() -> float | None:
        # XLA's own count for the compiled step (the jitted step exposes lower()).
        analysis = cost_analysis(step, holder["state"], batch)
        return float(analysis.get("flops", 0.0)) if analysis else None

    def op_profile() -> str:
        """Time per XLA op over 3 steps, from a jax.profiler trace (ops of the same kind summed)."""
        ops = op_times(run)
        total = sum(ms for _, ms, _ in ops) or 1.0
        lines = [f"{'XLA op (numbering stripped)':<44}{'share':>8}{'total ms':>12}{'calls':>8}"]
        for kind, ms, calls in ops[:15]:
            lines.append(f"{kind[:43]:<44}{ms / total:>8.1%}{ms:>12.1f}{calls:>8}")
        lines.append(f"{'all ops (threads summed)':<44}{'':>8}{total:>12.1f}")
        return "\n".join(lines)

    return Step(run, phases, memory, op_profile=op_profile, flops=flops)


def torch_step(cfg: dict[str, Any], route: str) -> Step:
    import torch

    from baselines.torch import layout, losses, models

    torch.manual_seed(0)
    device = torch.device("cuda" if cfg["device"] == "gpu" else "cpu")
    model = models.create(cfg["model"], **model_kwargs(cfg["model"], cfg["width"])).to(device).train()
    if route == "torch_func_compile":
        torch.func.replace_all_batch_norm_modules_(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss = losses.for_method(cfg["loss"])
    arrays = make_batch(cfg)
    batch = {"image": torch.from_numpy(layout.nhwc_to_nchw(arrays["image"])).to(device),
             "label": torch.from_numpy(arrays["label"].astype("int64")).to(device),
             "saliency_map": torch.from_numpy(arrays["saliency_map"]).to(device),
             "has_map": torch.from_numpy(arrays["has_map"]).to(device)}
    b, _, h, w = batch["image"].shape
    draw_shapes = {"image": tuple(batch["image"].shape), "pixels": (b, h * w)}
    draws = [(f"uniform/{name}", draw_shapes[kind]) for name, kind in DRAWS.get(cfg["loss"], [])]

    def redraw() -> None:
        for name, shape in draws:
            batch[name] = torch.rand(shape, device=device)

    redraw()

    def autocast():
        if cfg["dtype"] == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def value_eager() -> torch.Tensor:
        with autocast():
            return loss(model, batch)[0]

    if route == "torch_eager":
        value = value_eager

        def grads() -> None:
            value().backward()
    elif route == "torch_compile":
        compiled = torch.compile(lambda b: loss(model, b)[0])

        def value() -> torch.Tensor:
            with autocast():
                return compiled(batch)

        def grads() -> None:
            value().backward()
    else:
        buffers = dict(model.named_buffers())

        def grad_and_value(params: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
            return torch.func.grad_and_value(lambda p: loss.functional(model, {**p, **buffers}, b)[0])(params)

        compiled = torch.compile(grad_and_value)
        named = list(model.named_parameters())

        def value() -> torch.Tensor:
            with autocast():
                return compiled({n: p.detach() for n, p in named}, batch)[1]

        def grads() -> None:
            with autocast():
                g, _ = compiled({n: p.detach() for n, p in named}, batch)
            for n, p in named:
                p.grad = g[n]

    def run() -> None:
        redraw()
        optimizer.zero_grad(set_to_none=True)
        grads()
        optimizer.step()
        sync()

    def timed(fn: Callable[[], Any]) -> Callable[[], None]:
        def go() -> None:
            fn()
            sync()
        return go

    def forward() -> None:
        with torch.no_grad(), autocast():
            model(batch["image"])

    def backward_only() -> None:
        optimizer.zero_grad(set_to_none=True)
        grads()
        sync()

    phases = {"forward": timed(forward), "loss": timed(value), "loss+grad": backward_only, "step": run}

    def memory() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    def op_profile() -> str:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                run()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40)

    def flops() -> float | None:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                total = loss(model, batch)[0]
            total.backward()
        optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    return Step(run, phases, memory, op_profile, flops)


def worker(framework: str, cfg: dict[str, Any]) -> int:
    """Serves one framework's step: commands on stdin, one JSON line per answer on stdout."""
    # Answers go to the original stdout; anything the libraries print goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if cfg["device"] == "cpu" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: cfg["threads"]]))
    if framework != "saljax":
        import torch

        torch.set_num_threads(cfg["threads"])

    def answer(obj: dict[str, Any]) -> None:
        answers.write(json.dumps(obj) + "\n")

    t0 = time.perf_counter()
    try:
        step = saljax_step(cfg) if framework == "saljax" else torch_step(cfg, framework)
    except Exception as err:  # noqa: BLE001 - reported to the driver
        answer({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
        return 1
    answer({"ready": True, "setup_s": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "warmup":
                t = time.perf_counter()
                step.run()
                first = time.perf_counter() - t
                for _ in range(int(args[0])):
                    step.run()
                answer({"first_step_s": first})
            elif cmd == "run":
                times = []
                for _ in range(int(args[0])):
                    t = time.perf_counter()
                    step.run()
                    times.append(time.perf_counter() - t)
                answer({"times": times})
            elif cmd == "profile":
                n = int(args[0])
                out: dict[str, Any] = {"phases": {}}
                for name, fn in step.phases.items():
                    fn()  # compile
                    times = []
                    for _ in range(n):
                        t = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - t)
                    out["phases"][name] = statistics.median(times)
                with contextlib.suppress(Exception):
                    out["flops"] = step.flops()
                if step.op_profile is not None:
                    with contextlib.suppress(Exception):
                        out["ops"] = step.op_profile()
                answer(out)
            elif cmd == "exit":
                answer({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "device_peak_mb": step.memory()})
                return 0
            else:
                answer({"error": f"unknown command {cmd!r}"})
        except Exception as err:  # noqa: BLE001 - reported to the driver, the worker goes on
            answer({"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                    "traceback": traceback.format_exc()})
    return 0


# --- the driver -------------------------------------------------------------------------------------------


class Worker:
    """A framework's process; `ask(cmd)` sends one command and returns its JSON answer."""

    def __init__(self, framework: str, cfg: dict[str, Any], torch_python: str, log: Path):
        python = sys.executable if framework == "saljax" else torch_python
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if framework != "saljax":
            # PyTorch's OpenMP threads spin while they wait for each other; on a shared machine a
            # descheduled thread then stalls the others (steps 10x slower). PASSIVE makes them sleep.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.framework = framework
        self._log = open(log, "a")
        self._proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", framework, "--config", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1, env=env, cwd=REPO)
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            how = f"crashed (signal {-code})" if code < 0 else f"ended (exit {code})"
            return {"error": f"the {self.framework} process {how}; its stderr is in {self._log.name}"}
        return json.loads(line)

    def ask(self, cmd: str) -> dict[str, Any]:
        if self._proc.poll() is not None:
            return {"error": f"the {self.framework} process has ended"}
        self._proc.stdin.write(cmd + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        out = self.ask("exit") if self._proc.poll() is None else {}
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
        return out


def short_error(answer: dict[str, Any]) -> str:
    text = answer.get("error", "")
    return text if len(text) < 200 else text[:197] + "..."


def bench_one(cfg: dict[str, Any], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Starts every framework for one configuration, alternates timed runs, returns the results."""
    result: dict[str, Any] = {"config": cfg, "frameworks": {}}
    workers: dict[str, Worker] = {}
    for fw in args.frameworks:
        # One at a time: a framework's start-up and compilation never overlap another's timing.
        w = Worker(fw, cfg, args.torch_python, log)
        entry: dict[str, Any] = {"setup_s": w.ready.get("setup_s")}
        if "error" in w.ready:
            entry["error"] = short_error(w.ready)
            w.close()
        else:
            warm = w.ask(f"warmup {args.warmup}")
            if "error" in warm:
                entry["error"] = short_error(warm)
                entry["close"] = w.close()
            else:
                entry["first_step_s"] = warm["first_step_s"]
                workers[fw] = w
        entry["times"] = []
        result["frameworks"][fw] = entry
        print(f"  {fw}: {'ready' if fw in workers else entry.get('error')}", flush=True)
    order = list(workers)
    for rep in range(args.reps):
        # A B C, B C A, ...: no framework always runs right after another one.
        for fw in order[rep % len(order):] + order[: rep % len(order)] if order else []:
            answer = workers[fw].ask(f"run {args.steps}")
            if "error" in answer:
                result["frameworks"][fw]["error"] = short_error(answer)
            else:
                result["frameworks"][fw]["times"] += answer["times"]
    if args.profile and "saljax" in workers:
        result["profile"] = maybe_profile(result, workers, args)
    for fw, w in workers.items():
        result["frameworks"][fw].update(w.close())
    for entry in result["frameworks"].values():
        if entry["times"]:
            entry["median_s"] = statistics.median(entry["times"])
    return result


def maybe_profile(result: dict[str, Any], workers: dict[str, Worker], args: argparse.Namespace) -> dict[str, Any] | None:
    """Phase timings (and torch.profiler's top ops) where saljax misses a target, or always with
    `--profile always`."""
    fws = result["frameworks"]
    saljax_t = statistics.median(fws["saljax"]["times"]) if fws["saljax"]["times"] else None
    torch_ts = [statistics.median(fws[fw]["times"]) for fw in workers if fw != "saljax" and fws[fw]["times"]]
    missed = saljax_t is not None and torch_ts and saljax_t > min(torch_ts)
    if args.profile != "always" and not missed:
        return None
    return {fw: w.ask(f"profile {max(5, args.steps)}") for fw, w in workers.items()
            if fw in ("saljax", "torch_eager")}


# --- the report ---------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    return {"cpu": cpu_name(), "cores": str(os.cpu_count()), "os": platform.platform()}


def versions(torch_python: str) -> dict[str, str]:
    import flax
    import jax
    import jaxlib
    import optax

    out = {"python (saljax)": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "flax": flax.__version__, "optax": optax.__version__}
    with contextlib.suppress(Exception):
        torch_info = subprocess.run(
            [torch_python, "-c", "import platform, torch; print(platform.python_version(), torch.__version__)"],
            capture_output=True, text=True, timeout=120).stdout.split()
        out["python (torch)"], out["torch"] = torch_info
    return out


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def write_report(results: list[dict[str, Any]], args: argparse.Namespace, command: str, path: str) -> str:
    m, v = machine(), versions(args.torch_python)
    lines = [
        "# saljax vs PyTorch: train-step time per loss",
        "",
        "Generated by `benchmarks/vs_torch.py`; rerun with the command below. Every framework runs in its",
        "own process, pinned to the same cores with the same number of threads; timed runs alternate",
        f"between the processes ({args.reps} rounds of {args.steps} steps each, after {args.warmup} warm-up",
        "steps), and the tables give the median step time over all timed steps. The machine was shared with",
        "other jobs: alternating runs and medians make the comparison fair, but absolute times are noisy.",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['os']}); device: {args.device}, {args.threads} threads",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- command: `{command}`",
        "- PyTorch workers run with `OMP_WAIT_POLICY=PASSIVE` (unless set): spinning OpenMP threads stall",
        "  whenever the shared machine deschedules one of them",
        "- step: loss + parameter gradients + SGD (lr 0.01, momentum 0.9); saljax: `saljax.train.make_train_step`;",
        "  PyTorch: `baselines.torch` (eager: `autograd.grad(..., create_graph=True)` then `backward()`)",
        "",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        c = r["config"]
        groups.setdefault((c["model"], c["dtype"], c["size"], c["batch"], c["width"]), []).append(r)
    fws = args.frameworks
    for (model, dtype, size, batch, width), rs in groups.items():
        width_text = f", width {width}" if model != "simple_cnn" else ""
        lines += [f"## {model}{width_text}, {size}x{size}, batch {batch}, {dtype}, {args.device}", ""]
        head = ["loss"] + [f"{fw} ms" for fw in fws]
        ratio_cols = [fw for fw in fws if fw != "saljax"]
        head += [f"saljax / {fw}" for fw in ratio_cols] + ["peak RSS MB (" + " / ".join(fws) + ")"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            f = r["frameworks"]
            row = [r["config"]["loss"]]
            for fw in fws:
                e = f.get(fw, {})
                row.append(fmt_ms(e.get("median_s")) if "median_s" in e else "fails")
            s = f.get("saljax", {}).get("median_s")
            for fw in ratio_cols:
                o = f.get(fw, {}).get("median_s")
                row.append(f"{s / o:.2f}" if s and o else "-")
            row.append(" / ".join(f"{f[fw]['maxrss_mb']:.0f}" if f.get(fw, {}).get("maxrss_mb") else "-" for fw in fws))
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "First step (compilation included), seconds:", ""]
        lines += ["| loss | " + " | ".join(fws) + " |", "|" + "---|" * (len(fws) + 1)]
        for r in rs:
            f = r["frameworks"]
            lines.append("| " + r["config"]["loss"] + " | " + " | ".join(
                f"{f[fw]['first_step_s']:.1f}" if f.get(fw, {}).get("first_step_s") is not None else "-" for fw in fws) + " |")
        errors = [(r["config"]["loss"], fw, e["error"]) for r in rs for fw, e in r["frameworks"].items() if e.get("error")]
        if errors:
            lines += ["", "Failures:", ""]
            lines += [f"- {loss} / {fw}: `{err}`" for loss, fw, err in errors]
        profiles = [(r["config"]["loss"], r["profile"]) for r in rs if r.get("profile")]
        if profiles:
            lines += ["", "Where the time goes, where saljax is slower (median time per phase; forward = logits only,",
                      "loss = value incl. input gradients, loss+grad = value and parameter gradients, step = loss+grad",
                      "+ SGD; GFLOP from XLA's cost analysis and torch's FlopCounterMode, which cannot count double",
                      "backward):", ""]
            lines += ["| loss | framework | forward | loss | loss+grad | step | GFLOP per step | GFLOP/s |",
                      "|---|---|---|---|---|---|---|---|"]
            for loss, prof in profiles:
                for fw, p in prof.items():
                    ph = p.get("phases", {})
                    flops = p.get("flops")
                    cells = [f"{ph[k] * 1e3:.1f} ms" if k in ph else "-" for k in ("forward", "loss", "loss+grad", "step")]
                    if flops and ph.get("step"):
                        cells += [f"{flops / 1e9:.2f}", f"{flops / ph['step'] / 1e9:.1f}"]
                    else:
                        cells += ["-", "-"]
                    lines.append(f"| {loss} | {fw} | " + " | ".join(cells) + " |")
            for loss, prof in profiles:
                ops = prof.get("saljax", {}).get("ops")
                if ops:
                    lines += ["", f"jax.profiler, saljax, {loss} (3 steps):", "", "```", ops.rstrip(), "```"]
                ops = prof.get("torch_eager", {}).get("ops")
                if ops:
                    lines += ["", f"torch.profiler, torch_eager, {loss} (3 steps):", "", "```", ops.rstrip(), "```"]
        lines.append("")
    if args.device == "cpu":
        lines += ["## GPU", "",
                  "Pending: no GPU was available for this run. `benchmarks/vs_torch.py --device gpu` times ResNet-50",
                  "at 224x224, batch 64, in float32 and bfloat16 (saljax `dtype=bfloat16`, PyTorch autocast), and",
                  "also reports the peak of each framework's device allocator.", ""]
    text = "\n".join(lines)
    if path != "-":
        Path(path).write_text(text)
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--models", help="comma-separated: simple_cnn, resnet18, resnet50 (default: the device's preset)")
    p.add_argument("--losses", default=",".join(LOSSES),
                   help=f"comma-separated methods (default {','.join(LOSSES)}); 'methods': {','.join(METHOD_LOSSES)}")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated, from {','.join(FRAMEWORKS)}")
    p.add_argument("--dtypes", help="comma-separated: float32, bfloat16 (default: the device's preset)")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int, help="image height = width")
    p.add_argument("--width", type=int, help="ResNet base width")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every framework")
    p.add_argument("--reps", type=int, default=5, help="rounds of alternated timed runs")
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="phase timings and torch.profiler ops where saljax is slower (auto), always or never")
    p.add_argument("--torch-python", default=os.environ.get("SALJAX_TORCH_PYTHON"),
                   help="a Python with torch (default $SALJAX_TORCH_PYTHON)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"), help="report path; '-' prints only")
    p.add_argument("--json", help="also write the raw results here (after every configuration)")
    p.add_argument("--report-from", metavar="JSON", help="only write the report from the raw results of an earlier run")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    preset = PRESETS[args.device]
    args.models = args.models.split(",") if args.models else list(preset["models"])
    args.dtypes = args.dtypes.split(",") if args.dtypes else list(preset["dtypes"])
    args.losses = [m for name in args.losses.split(",") for m in (METHOD_LOSSES if name == "methods" else (name,))]
    args.frameworks = args.frameworks.split(",")
    for fw in args.frameworks:
        if fw not in FRAMEWORKS:
            p.error(f"unknown framework {fw!r}")
    args.batch = args.batch or preset["batch"]
    args.size = args.size or preset["size"]
    args.width = args.width or preset["width"]
    args.profile = None if args.profile == "never" else args.profile
    if any(fw != "saljax" for fw in args.frameworks) and not args.torch_python:
        p.error("PyTorch runs in its own interpreter: set SALJAX_TORCH_PYTHON or pass --torch-python"
                " (`make torch-env` builds .venv-torch)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, json.loads(args.config))
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/vs_torch.py", *(sys.argv[1:] if argv is None else argv)])
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        print(write_report(saved["results"], args, saved["command"], args.out))
        return 0
    log = Path(tempfile.gettempdir()) / "saljax_vs_torch.log"  # the workers' stderr
    log.write_text("")
    print(f"worker logs: {log}", flush=True)
    results = []
    for model in args.models:
        for dtype in args.dtypes:
            for loss in args.losses:
                cfg = {"model": model, "loss": loss, "dtype": dtype, "device": args.device, "batch": args.batch,
                       "size": args.size, "width": args.width, "threads": args.threads}
                print(f"{model} {dtype} {loss}", flush=True)
                r = bench_one(cfg, args, log)
                results.append(r)
                print("  " + ", ".join(f"{fw} {fmt_ms(e.get('median_s'))} ms" for fw, e in r["frameworks"].items()), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"command": command, "results": results}, indent=1))
    print(write_report(results, args, command, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
