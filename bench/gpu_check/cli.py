"""The command: options, the per-size run under the time guard, the report (last line: one JSON object)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence

import peft
import torch
import transformers

import bench.gpu_check as package
from bench.gpu_check.correctness import check_correctness
from bench.gpu_check.models import CONFIGS, EXPERTS, LLAMA_COMMON, build_models
from bench.gpu_check.timing import Clock, measure_decode, measure_engine

RATIO_MEANING = "throughput of the first variant over the second, median of per-step pairs; below 1 = slower"


def run_size(size: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, clock: Clock,
             report: dict) -> None:
    """Build one size's models, check them, then race them at each batch size while the time guard allows."""
    started = time.perf_counter()
    print(f"[{size}] building backbone, {EXPERTS} experts, peft ...", flush=True)
    m = build_models(size, device, dtype)
    params = sum(p.numel() for p in m.bare.model.parameters())
    shape = {k: v for k, v in CONFIGS[size].items() if k not in LLAMA_COMMON}
    report["configs"][size] = {**shape, "parameters": params, "build_s": round(time.perf_counter() - started, 1)}
    check = report["correctness"][size] = check_correctness(m, device, dtype)
    print(f"[{size}] correctness {'ok' if check['passed'] else 'FAILED'}: max abs err {check['max_abs_err']} "
          f"(tolerance {check['tolerance']}, lora effect {check['lora_effect']})", flush=True)
    clock.done(started)
    for batch in args.batch_sizes:
        for part in ("decode", "engine"):
            if not clock.allows(f"{size}/{part}/b{batch}"):
                continue
            begun = time.perf_counter()
            if part == "decode":
                result = measure_decode(m, batch, args.steps, args.rounds, device, clock)
            else:
                result = measure_engine(m, batch, args.steps, args.rounds)
            report[part].setdefault(size, {})[f"b{batch}"] = result
            clock.done(begun)
            print(f"[{size}] {part} batch {batch}: {result['ratios']} ({time.perf_counter() - begun:.1f} s)",
                  flush=True)
    if device.type == "cuda":
        report["peak_memory_gib"][size] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump: the caller reads the last lines only
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _listed(choices: Sequence[str] | None, kind: str):
    def parse(text: str) -> list:
        values = [v.strip() for v in text.split(",") if v.strip()]
        for value in values:
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(f"unknown {kind} {value!r} (known: {', '.join(choices)})")
            if choices is None and not (value.isdigit() and int(value) > 0):
                raise argparse.ArgumentTypeError(f"bad {kind} {value!r} (a positive integer)")
        if not values:
            raise argparse.ArgumentTypeError(f"no {kind} given")
        return values if choices is not None else [int(v) for v in values]
    return parse


def _positive(text: str) -> int:
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"bad value {text!r} (a positive integer)")
    return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="bench.gpu_check", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_listed(("135m", "1b"), "size"), default=["135m", "1b"])
    parser.add_argument("--batch-sizes", type=_listed(None, "batch size"), default=[16, 64])
    parser.add_argument("--steps", type=_positive, default=None, help="decode steps per round (24; dry run 3)")
    parser.add_argument("--rounds", type=_positive, default=None, help="timed rounds, fresh prefill each (3; 1)")
    parser.add_argument("--budget-s", type=_positive, default=300, help="time guard for the whole run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dry-run", action="store_true", help="tiny Llama config, few steps: a smoke test")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.dry_run:
        args.sizes = ["tiny"]
    args.steps = args.steps or (3 if args.dry_run else 24)
    args.rounds = args.rounds or (1 if args.dry_run else 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}, {dtype}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; sizes {args.sizes}, batch sizes {args.batch_sizes}, {args.steps} steps x "
          f"{args.rounds} rounds, budget {args.budget_s} s", flush=True)
    clock = Clock(args.budget_s)
    report: dict = {"bench": "gpu_check", "device": name, "dtype": str(dtype).removeprefix("torch."),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "peft": peft.__version__},
                    "dry_run": args.dry_run, "steps": args.steps, "rounds": args.rounds,
                    "batch_sizes": args.batch_sizes, "ratio_meaning": RATIO_MEANING, "configs": {},
                    "correctness": {}, "decode": {}, "engine": {}, "peak_memory_gib": {}}
    for size in args.sizes:
        if clock.allows(size):
            run_size(size, args, device, dtype, clock, report)
    report["time_guard"] = {"budget_s": args.budget_s, "hit": bool(clock.skipped or clock.truncated),
                            "skipped": clock.skipped, "truncated": clock.truncated}
    report["elapsed_s"] = round(clock.elapsed(), 1)
    report["passed"] = bool(report["correctness"]) and all(c["passed"] for c in report["correctness"].values())
    print(json.dumps(report))
    return 0 if report["passed"] else 1


