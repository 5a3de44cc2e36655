"""Where one step's time goes: `torch.profiler` over a benchmark case (default: the Prompt Diffusion
training step), as PyTorch's operator table and as a short table by kind of work.

The step is built exactly as `icd bench` builds it (same recipe, fast paths, dtype), warmed up, then
profiled for a few steps. The kinds (convolution, matmul, attention, normalisation, elementwise,
optimiser, copies and casts) say which fix pays: e.g. a large "copies and casts" share under bf16
autocast is the fp32 -> bf16 weight casting, a large "optimizer" share the AdamW passes.
Usage: python benchmarks/profile_step.py [--case prompt_diffusion-train] [--size sd15] [--resolution 256]
       [--batch 32] [--dtype bf16] [--set train.gradient_checkpointing=false ...] [--out outputs/bench-gpu]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from incontext_diffusion.bench import build_step
from incontext_diffusion.core.trainer import apply_fast_paths

# First match wins: operator-name fragments of each kind of work.
KINDS = [
    ("attention", ("attention", "flash", "efficient_attention", "_scaled_dot_product", "bmm", "baddbmm", "softmax")),
    ("convolution", ("conv", "cudnn")),
    ("matmul", ("mm", "matmul", "linear", "gemm", "addmm")),
    ("normalisation", ("group_norm", "layer_norm", "native_batch_norm", "norm")),
    ("optimizer", ("adam", "_foreach", "_fused")),
    ("copies and casts", ("copy", "to_copy", "_to", "contiguous", "cat", "clone")),
    ("elementwise", ("add", "mul", "silu", "gelu", "sigmoid", "div", "sub", "pow", "exp", "where", "fill", "zero")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KINDS if any(f in lowered for f in fragments)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="prompt_diffusion-train")
    parser.add_argument("--size", default="sd15", choices=["tiny", "sd15"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 untimed and 1 warm-up step)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-gpu"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    head, model, run = build_step(args.case, args.size, device, args.dtype, args.batch, args.resolution, None, tuple(args.overrides))
    apply_fast_paths([model, *head.frozen()], head.recipe.train)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=2, warmup=1, active=args.steps)) as profiler:
        for _ in range(3 + args.steps):
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            profiler.step()

    time_key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = profiler.key_averages()
    operators = events.table(sort_by=time_key, row_limit=30)
    totals: dict[str, float] = {}
    for event in events:
        if event.key.startswith("ProfilerStep"):
            continue
        totals[kind_of(event.key)] = totals.get(kind_of(event.key), 0.0) + getattr(event, time_key)
    whole = sum(totals.values()) or 1.0
    lines = [f"## Where a {args.case} step goes ({device}, {args.size}, {args.resolution}px, batch {args.batch}, {args.dtype})", "",
             f"| kind | {'device' if device == 'cuda' else 'CPU'} ms per step | share |", "|---|---|---|"]
    for kind, total in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {total / 1e3 / args.steps:.2f} | {100 * total / whole:.1f}% |")
    summary = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"profile_{args.case}_{args.resolution}"
    (args.out / f"{name}.md").write_text(summary + "\n```\n" + operators + "\n```\n")
    profiler.export_chrome_trace(str(args.out / f"{name}.trace.json"))
    print(summary)
    print(operators)
    print(f"wrote {args.out / (name + '.md')} and the Chrome trace {args.out / (name + '.trace.json')}")


if __name__ == "__main__":
    main()
