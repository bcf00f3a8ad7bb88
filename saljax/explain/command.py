"""`saljax explain`: load a checkpoint, explain a dataset split, write the report."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from saljax import data as sd
from saljax import train
from saljax import workdir as workdir_lib
from saljax.explain.batches import no_maps_error
from saljax.explain.report import format_stats, run
from saljax.explain.settings import METHODS, ExplainConfig

_DEFAULT_SPLITS = ("test", "test_closed", "validation", "train")
_DEFAULTS = ExplainConfig()  # the options' defaults are the config's


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declares the options of `saljax explain` on `parser` (returned for chaining)."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="directory of a saljax training checkpoint")
    parser.add_argument(
        "--dataset",
        metavar="NAME[:split]",
        help="saljax dataset (optionally name/config) and split, e.g. spurious_binary:test_open; default: the "
        "training config's dataset, split test (or test_closed, validation, train: the first that exists)",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="root of the prepared datasets (default: the training config's)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for report.md, figures and tables")
    parser.add_argument(
        "--methods",
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(METHODS)} (default: every method the model supports)",
    )
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                        help=f"images per jit-compiled call (default {_DEFAULTS.batch_size})")
    parser.add_argument(
        "--num-images", type=int, default=8, help="images plotted at each end of the ranking (default 8)"
    )
    parser.add_argument("--ig-steps", type=int, default=_DEFAULTS.ig_steps,
                        help=f"Integrated Gradients steps (default {_DEFAULTS.ig_steps})")
    parser.add_argument("--smoothgrad-samples", type=int, default=_DEFAULTS.smoothgrad_samples,
                        help=f"SmoothGrad noisy samples (default {_DEFAULTS.smoothgrad_samples})")
    parser.add_argument(
        "--smoothgrad-stdevs", type=float, default=_DEFAULTS.smoothgrad_stdevs,
        help=f"SmoothGrad noise, fraction of the value range ({_DEFAULTS.smoothgrad_stdevs})"
    )
    parser.add_argument("--top-q", type=float, default=_DEFAULTS.top_q,
                        help=f"fraction of pixels in the top-q region (default {_DEFAULTS.top_q})")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"seed of SmoothGrad's noise (default {_DEFAULTS.seed})")
    parser.add_argument(
        "--no-map-metrics",
        action="store_true",
        help="explain a split without human maps (otherwise missing maps are an error)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _field(node: Any, name: str) -> Any:
    """`node.name` of a ConfigDict, dict or object; None when absent."""
    if node is None:
        return None
    try:
        return node[name]
    except (KeyError, TypeError, AttributeError):
        return getattr(node, name, None)


def _dataset_settings(args: argparse.Namespace, train_config: Any) -> dict[str, Any]:
    """Dataset, builder config, overrides, data_dir, split and normalisation for `main`.

    The command line wins; missing values come from the training config's `dataset` section
    (`saljax.config`: name, config, overrides, data_dir, manual_dir, mean, std). The builder config,
    overrides and manual_dir of the training run apply only to the dataset it was trained on.
    """
    trained = _field(train_config, "dataset")
    spec = args.dataset or _field(trained, "name")
    if not spec:
        raise ValueError("--dataset NAME[:split] is required (the checkpoint's config names no dataset)")
    name, _, split = str(spec).partition(":")
    name, _, builder_config = name.partition("/")
    same = name == _field(trained, "name")
    data_dir = args.data_dir or _field(trained, "data_dir")
    if not data_dir:
        raise ValueError("--data-dir is required (the checkpoint's config names no data_dir)")
    overrides = _field(trained, "overrides") if same else None
    return {
        "name": name,
        "config": builder_config or ((_field(trained, "config") or None) if same else None),
        "overrides": dict(overrides.items()) if overrides else {},
        "manual_dir": (_field(trained, "manual_dir") or None) if same else None,
        "data_dir": os.path.expanduser(str(data_dir)),
        "split": split or None,
        "mean": _field(trained, "mean"),
        "std": _field(trained, "std"),
    }


def _checkpoint_kind(train_config: Any) -> str:
    metric = _field(_field(train_config, "checkpoint"), "best_metric")
    return f"the best by {metric}, or the newest readable one" if metric else "the newest readable one"


def _check_split_has_maps(builder: Any, split: str) -> None:
    """Raises the error that explaining would raise at the end when no image of `split` has a map.

    Reads only `has_map`, stopping at the first image that has one: a split without maps would
    otherwise cost a whole explanation pass before the error.
    """
    records = builder.as_data_source(split)
    if not any(bool(records[i]["has_map"]) for i in range(len(records))):
        raise no_maps_error(split, len(records))


def main(args: argparse.Namespace) -> int:
    """`saljax explain`: loads a checkpoint, explains a dataset split, writes the report.

    Options missing on the command line come from the training config that
    `train.load_model` returns (see `_dataset_settings`); the split defaults to the first of
    test, test_closed, validation, train that the dataset has. Returns 0 on success, 2 with a
    message on stderr for bad input (missing checkpoint directory, unusable checkpoint, unknown
    dataset or split, methods the model does not support, missing maps).
    """
    prog = "saljax explain"
    try:  # the options first: nothing is loaded or built for a run that would refuse them
        ExplainConfig(methods=args.methods, batch_size=args.batch_size, ig_steps=args.ig_steps,
                      smoothgrad_samples=args.smoothgrad_samples, smoothgrad_stdevs=args.smoothgrad_stdevs,
                      top_q=args.top_q, map_metrics=not args.no_map_metrics, seed=args.seed)
        if args.num_images < 0:
            raise ValueError(f"--num-images must be >= 0; got {args.num_images}")
        unknown = [m.strip() for m in (args.methods or "").split(",") if m.strip() and m.strip() not in METHODS]
        if unknown:
            raise ValueError(f"unknown explanation method(s) {unknown}; expected some of {METHODS}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file; expected a directory (or a path to create)")
    except ValueError as err:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.checkpoint):
        print(f"{prog}: checkpoint directory {args.checkpoint!r} does not exist", file=sys.stderr)
        return 2
    try:
        model, train_config, step = train.load_model(args.checkpoint, with_step=True)
    except (workdir_lib.CheckpointError, FileNotFoundError, ValueError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: cannot load a model from {args.checkpoint!r}: {err}", file=sys.stderr)
        return 2
    try:
        ds = _dataset_settings(args, train_config)
        name = ds["name"]
        builder = sd.from_config(ds)
        splits = sorted(builder.info.splits.keys())
        split = ds["split"] or next((s for s in _DEFAULT_SPLITS if s in splits), splits[0])
        if split not in splits:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {splits}")
        if not args.no_map_metrics:
            _check_split_has_maps(builder, split)
        loader = sd.make_loader(
            builder, split, args.batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
            mean=ds["mean"], std=ds["std"],
        )
        group_names = getattr(importlib.import_module(f"saljax.data.{name}"), "GROUP_NAMES", None)
        summary = run(
            model,
            loader,
            out_dir=args.out,
            methods=args.methods,
            num_images_to_plot=args.num_images,
            split_name=split,
            batch_size=args.batch_size,
            ig_steps=args.ig_steps,
            smoothgrad_samples=args.smoothgrad_samples,
            smoothgrad_stdevs=args.smoothgrad_stdevs,
            top_q=args.top_q,
            map_metrics=not args.no_map_metrics,
            seed=args.seed,
            group_names=dict(enumerate(group_names)) if group_names else None,
            progress=not args.no_progress,
            source=f"{args.checkpoint}, step {step} ({_checkpoint_kind(train_config)})",
        )
    except ValueError as err:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(f"{prog}: {summary['num_images']} images of {name}:{split} ({summary['num_with_map']} with a map)")
    table = summary["aggregate"]["split"]
    for method in summary["methods"]:
        stats = table.get(method, {}).get("energy_inside")
        if stats is not None:
            print(f"  {method:22s} energy inside the map {format_stats(stats)}")
    print(f"{prog}: report written to {summary['files']['report']}")
    return 0
