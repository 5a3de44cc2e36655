"""`icd bench`: training-step and inference benchmarks of every head, at any size.

A case builds a head from its recipe and times the head's own code path on one batch of its own
data: the training step (head.loss, backward, gradient clipping, optimiser step, as the trainer
runs it) or the head's inference pipeline. The tiny recipes run on a CPU; `--size sd15` swaps in
SD1.5's architecture with random weights (`backbone: random-sd15`, no download) for a GPU.
Model FLOPs are counted by `torch.utils.flop_counter` over one eager step (matmuls, convolutions
and attention, 2 per multiply-add: the usual numerator of MFU); elementwise work is not counted.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import send_to_device
from torch.utils.flop_counter import FlopCounterMode

from .core.head import Head, load_head
from .core.trainer import apply_fast_paths, make_optimizer, place_frozen
from .errors import UserError
from .recipes import load_recipe

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (datasheet figures without sparsity), by device name.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    """One benchmark: a recipe, what to time, and the per-head details."""

    recipe: str  # the tiny recipe (--size tiny)
    sd15_recipe: str | None  # the paper-size recipe, run on synthetic scenes (--size sd15); None: tiny only
    kind: str  # "train" or "infer"
    resolution: int  # the default image size at --size sd15
    batch: int
    infer: Callable | None = None  # (head, trained module, batch, steps) -> output, for kind "infer"
    steps: int = 0  # denoising steps of an inference case (0: none)


def _prompt_diffusion_infer(head: Head, model: torch.nn.Module, batch: dict, steps: int):
    pipe = head.pipeline(model)
    unit = {key: (batch[key][0] + 1) / 2 for key in ("example_source", "example_target", "query")}
    return pipe("a large red sphere", unit["query"], [unit["example_source"], unit["example_target"]], num_inference_steps=steps,
                guidance_scale=9.0, num_images_per_prompt=batch["query"].shape[0], output_type="pt", generator=torch.Generator().manual_seed(0))


def _meta_prompts_infer(head: Head, model: torch.nn.Module, batch: dict, steps: int):
    return model(batch["image"])  # what the pipeline runs per batch (its own model would hook the UNet twice)


def _grounding_infer(head: Head, model: torch.nn.Module, batch: dict, steps: int):
    return head.pipeline(model)(batch["images"], batch["texts"], generator=torch.Generator().manual_seed(0))


CASES = {
    "prompt_diffusion-train": Case("prompt_diffusion-tiny", "prompt_diffusion", "train", 256, 8),
    "prompt_diffusion-infer": Case("prompt_diffusion-tiny", "prompt_diffusion", "infer", 512, 1, _prompt_diffusion_infer, steps=50),
    "meta_prompts_depth-train": Case("meta_prompts_depth-tiny", "meta_prompts_nyu", "train", 512, 8),
    "meta_prompts_depth-infer": Case("meta_prompts_depth-tiny", "meta_prompts_nyu", "infer", 512, 8, _meta_prompts_infer),
    "meta_prompts_seg-train": Case("meta_prompts_seg-tiny", "meta_prompts_ade20k", "train", 512, 8),
    "diff_prompt_dit-train": Case("diff_prompt_dit-tiny", None, "train", 0, 32),
    "diff_prompt_grounding-train": Case("diff_prompt_grounding-tiny", None, "train", 0, 32),
    "diff_prompt-infer": Case("diff_prompt_grounding-tiny", None, "infer", 0, 1, _grounding_infer, steps=10),
}


@dataclass
class Record:
    """One measured row of the results table."""

    case: str
    device: str
    dtype: str
    batch: int
    size: int
    steps: int
    seconds_per_iter: float  # median
    samples_per_s: float
    gflop_per_sample: float
    achieved_tflops: float
    mfu: float | None  # achieved / peak, when the peak is known
    peak_memory_gib: float  # GPU: max allocated; CPU: the process's peak resident set
    fast_paths: str
    iterations: int


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    name = device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def count_flops(run: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def time_iterations(run: Callable[[], object], device: torch.device, warmup: int, iterations: int) -> list[float]:
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def first_batch(head: Head, batch_size: int, device: torch.device):
    dataset = head.train_dataset()
    if len(dataset) < batch_size:
        raise UserError(f"the recipe's dataset has {len(dataset)} samples, fewer than --batch {batch_size}: lower --batch")
    return send_to_device(head.collate([dataset[i] for i in range(batch_size)]), device)


def build_head(case: Case, size: str, resolution: int | None, batch: int, overrides: list[str], device: torch.device) -> Head:
    settings = [f"train.batch_size={batch}", f"data.num_samples={max(batch, 8)}", "data.num_workers=0"]
    recipe = case.recipe
    if size == "sd15":
        if case.sd15_recipe is None:
            raise UserError(f"{case.recipe} has no SD1.5-size form (its models are not SD modules): run it with --size tiny")
        recipe = case.sd15_recipe  # the paper's options, on random SD1.5 weights and synthetic scenes
        settings += ["backbone=random-sd15", "data.source=synthscenes", "data.path=null", f"data.size={resolution or case.resolution}"]
    elif resolution:
        settings.append(f"data.size={resolution}")
    head = load_head(load_recipe(recipe, settings + list(overrides)))
    with torch.device(device):  # random SD1.5-size weights are drawn on the device: seconds, not a minute
        head.build()
    return head


def run_case(name: str, size: str = "tiny", device: str = "cpu", dtype: str = "fp32", batch: int | None = None, resolution: int | None = None,
             steps: int | None = None, iterations: int = 10, warmup: int = 3, overrides: tuple[str, ...] = (), peak: float | None = None) -> Record:
    """Build case `name` and time it; see the module docstring."""
    if name not in CASES:
        raise UserError(f"unknown benchmark case {name!r}: choose from {', '.join(CASES)}")
    case = CASES[name]
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    batch = batch or case.batch
    head = build_head(case, size, resolution, batch, overrides, torch_device)
    cfg = head.recipe.train
    model = head.trainable().to(torch_device)
    half = DTYPES[dtype]
    data = first_batch(head, batch, torch_device)

    if case.kind == "train":
        place_frozen(head.frozen(), torch_device, half)
        if cfg.gradient_checkpointing:
            head.enable_gradient_checkpointing()
        optimizer = make_optimizer(head.parameter_groups(model, cfg.learning_rate), cfg)
        model.train()

        def run():
            with torch.autocast(torch_device.type, dtype=half, enabled=half != torch.float32):
                loss = head.loss(model, data, 0)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        for module in [model, *head.frozen()]:
            module.requires_grad_(False).to(torch_device).eval()
            if half != torch.float32:
                module.to(half)
        run_steps = steps or case.steps

        def run():
            with torch.no_grad():
                return case.infer(head, model, data, run_steps)

    flops = count_flops(run)  # eager, before any compilation
    apply_fast_paths([model, *head.frozen()], cfg)
    times = time_iterations(run, torch_device, warmup, iterations)
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    top = peak_tflops(torch_device, peak)
    switches = [key for key in ("allow_tf32", "channels_last", "gradient_checkpointing") if getattr(cfg, key)]
    switches += [f"compile ({cfg.compile_mode})"] if cfg.compile else []
    switches += [f"attention={cfg.attention}"] if cfg.attention != "sdpa" else []
    switches += [f"optimizer={cfg.optimizer}"] if case.kind == "train" and cfg.optimizer != "adamw" else []
    return Record(
        case=name,
        device=device_name(torch_device),
        dtype=dtype if case.kind == "infer" else (f"{dtype} autocast" if dtype != "fp32" else "fp32"),
        batch=batch,
        size=head.recipe.data.size,
        steps=(steps or case.steps) if case.kind == "infer" else 0,
        seconds_per_iter=seconds,
        samples_per_s=batch / seconds,
        gflop_per_sample=flops / batch / 1e9,
        achieved_tflops=achieved,
        mfu=achieved / top if top else None,
        peak_memory_gib=peak_memory_gib(torch_device),
        fast_paths=", ".join(switches) or "-",
        iterations=iterations,
    )


def markdown_table(records: list[Record]) -> str:
    header = "| case | device | dtype | batch | size | steps | s/iter (median) | samples/s | GFLOP/sample | TFLOP/s | MFU | peak mem GiB | fast paths |"
    lines = [header, "|" + "---|" * 13]
    for r in records:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        lines.append(
            f"| {r.case} | {r.device} | {r.dtype} | {r.batch} | {r.size} | {r.steps or '-'} | {r.seconds_per_iter:.4f} | {r.samples_per_s:.2f} | "
            f"{r.gflop_per_sample:.2f} | {r.achieved_tflops:.3f} | {mfu} | {r.peak_memory_gib:.2f} | {r.fast_paths} |"
        )
    return "\n".join(lines) + "\n"


def write_results(records: list[Record], out_dir: Path) -> tuple[Path, Path]:
    """Append to out_dir/bench.json and rewrite out_dir/bench.md with every record so far."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    previous = [Record(**r) for r in json.loads(json_path.read_text())] if json_path.is_file() else []
    everything = previous + records
    json_path.write_text(json.dumps([asdict(r) for r in everything], indent=1))
    md_path.write_text(markdown_table(everything))
    return json_path, md_path
