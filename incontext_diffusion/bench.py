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
import math
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
    "diff_prompt_mask_vae-train": Case("diff_prompt_mask_vae-tiny", None, "train", 0, 32),
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


def time_iterations(run: Callable[[], object], device: torch.device, warmup: int, iterations: int,
                    clock: Callable[[], float] = time.perf_counter) -> list[float]:
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(iterations):
        start = clock()
        run()
        synchronize(device)
        times.append(clock() - start)
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


def build_step(name: str, size: str = "tiny", device: str = "cpu", dtype: str = "fp32", batch: int | None = None, resolution: int | None = None,
               steps: int | None = None, overrides: tuple[str, ...] = ()) -> tuple[Head, torch.nn.Module, Callable[[], object]]:
    """The head, its trained module and one step of case `name` (a training step or an inference call), ready to run."""
    if name not in CASES:
        raise UserError(f"unknown benchmark case {name!r}: choose from {', '.join(CASES)}")
    case = CASES[name]
    torch_device = torch.device(device)
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

    return head, model, run


def run_case(name: str, size: str = "tiny", device: str = "cpu", dtype: str = "fp32", batch: int | None = None, resolution: int | None = None,
             steps: int | None = None, iterations: int = 10, warmup: int = 3, overrides: tuple[str, ...] = (), peak: float | None = None,
             clock: Callable[[], float] = time.perf_counter) -> Record:
    """Build case `name` and time it (wall clock unless `clock` says otherwise); see the module docstring."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    head, model, run = build_step(name, size, device, dtype, batch, resolution, steps, overrides)
    case, cfg, batch = CASES[name], head.recipe.train, batch or CASES[name].batch
    flops = count_flops(run)  # eager, before any compilation
    apply_fast_paths([model, *head.frozen()], cfg)
    times = time_iterations(run, torch_device, warmup, iterations, clock)
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


# ----------------------------------------------------------------------------- the cost sweep
# `icd bench --sweep`: time and peak memory of one training step against image size (at a fixed
# batch) and against batch (at a fixed size), one case per head, beside the counted FLOPs, so that
# growth steeper than the arithmetic shows up as a ratio above 1.

SWEEP_CASES = ("prompt_diffusion-train", "meta_prompts_depth-train", "diff_prompt_mask_vae-train")
SWEEP_SIZES = {"cpu": (64, 128, 256, 512), "cuda": (64, 128, 256, 512, 768, 1024)}
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)
SWEEP_BATCH = 4  # the batch of the size series
POINT_BUDGET_S = 60.0  # a point predicted (from the last one, by pixels x batch) to take longer is skipped


@dataclass
class SweepPoint:
    """One point of the sweep; `seconds_per_step` is None when it was not measured (see `note`)."""

    case: str
    series: str  # "size" (batch fixed) or "batch" (size fixed)
    device: str
    size: int
    batch: int
    seconds_per_step: float | None
    gflop_per_step: float | None
    peak_memory_gib: float | None  # GPU: max allocated; CPU: resident memory the point added to the process
    note: str = ""


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak since the process began)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _point_in_child(send, arguments: dict) -> None:
    """Runs in a child process: the point's own peak resident memory, above what the child held at start."""
    baseline = _status_kib("VmRSS")
    try:
        record = run_case(**arguments, clock=time.process_time)  # CPU seconds: other jobs on the machine do not inflate them
        send.send((asdict(record), (_status_kib("VmHWM") - baseline) / 2**20, ""))
    except (UserError, RuntimeError, MemoryError) as err:
        send.send((None, None, f"failed: {str(err).splitlines()[0]}"))


def measure_point(arguments: dict) -> tuple[Record | None, float | None, str]:
    """(record, peak memory GiB, note) of one `run_case`. A CPU point runs in a fresh child process, since a
    process's peak resident memory only grows; a GPU point runs here, its peak from the allocator."""
    if torch.device(arguments["device"]).type == "cuda":
        try:
            record = run_case(**arguments)
            return record, record.peak_memory_gib, ""
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None, None, "out of memory"
        except UserError as err:
            return None, None, f"failed: {err}"
    import multiprocessing

    # spawn, not fork: a fork of a process whose threads (torch's, the progress bars') hold locks can
    # deadlock in the child; a spawned child pays the imports (seconds) once per point instead.
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_point_in_child, args=(send, arguments))
    child.start()
    send.close()
    try:
        record, memory, note = receive.recv()
    except EOFError:  # the child died (killed for memory)
        record, memory, note = None, None, "failed: the process died (out of memory?)"
    child.join()
    return (Record(**record) if record else None), memory, note


def sweep(cases: list[str], device: str, dtype: str = "fp32", size: str = "tiny", sizes: tuple[int, ...] | None = None,
          batches: tuple[int, ...] = SWEEP_BATCHES, size_series_batch: int = SWEEP_BATCH, batch_series_size: int | None = None,
          iterations: int = 1, warmup: int = 0, overrides: tuple[str, ...] = (), budget_s: float = POINT_BUDGET_S,
          report: Callable[[SweepPoint], None] = lambda point: None) -> list[SweepPoint]:
    """Measure every case over `sizes` at `size_series_batch`, then over `batches` at `batch_series_size`."""
    sizes = sizes or SWEEP_SIZES[torch.device(device).type]
    batch_series_size = batch_series_size or sizes[0]
    points = []
    for name in cases:
        for series, grid in (("size", [(s, size_series_batch) for s in sizes]), ("batch", [(batch_series_size, b) for b in batches])):
            last, stop = None, ""  # the last measured point of the series; why the rest is skipped
            for resolution, batch in grid:
                note = stop
                if not note and last is not None:
                    work = (resolution / last.size) ** 2 * batch / last.batch
                    predicted = last.seconds_per_step * work * (iterations + warmup + 1)  # + the FLOP-counting pass
                    if predicted > budget_s:
                        note = f"skipped: about {predicted:.0f} s predicted (budget {budget_s:.0f} s)"
                if note:
                    point = SweepPoint(name, series, device_name(torch.device(device)), resolution, batch, None, None, None, note)
                else:
                    arguments = dict(name=name, size=size, device=device, dtype=dtype, batch=batch, resolution=resolution,
                                     iterations=iterations, warmup=warmup, overrides=overrides)
                    record, memory, note = measure_point(arguments)
                    point = SweepPoint(name, series, device_name(torch.device(device)), resolution, batch,
                                       record.seconds_per_iter if record else None,
                                       record.gflop_per_sample * batch if record else None, memory, note)
                    if record:
                        last = point
                    else:
                        stop = f"skipped after {note} at {resolution}px, batch {batch}"
                points.append(point)
                report(point)
    return points


def sweep_table(points: list[SweepPoint]) -> str:
    """One Markdown table; time and FLOP growth relative to the first measured point of each series."""
    lines = ["| case | series | size | batch | s/step | GFLOP/step | time × | FLOP × | time × ÷ FLOP × | peak mem GiB | note |", "|" + "---|" * 11]
    first: dict[tuple[str, str], SweepPoint] = {}
    for p in points:
        if p.seconds_per_step is None:
            lines.append(f"| {p.case} | {p.series} | {p.size} | {p.batch} | - | - | - | - | - | - | {p.note} |")
            continue
        base = first.setdefault((p.case, p.series), p)
        time_growth, flop_growth = p.seconds_per_step / base.seconds_per_step, p.gflop_per_step / base.gflop_per_step
        lines.append(f"| {p.case} | {p.series} | {p.size} | {p.batch} | {p.seconds_per_step:.4f} | {p.gflop_per_step:.2f} | {time_growth:.2f} | "
                     f"{flop_growth:.2f} | {time_growth / flop_growth:.2f} | {p.peak_memory_gib:.3f} | {p.note} |")
    return "\n".join(lines) + "\n"


def sweep_plot(points: list[SweepPoint], path: Path) -> Path:
    """A PNG of log-log panels: time and memory per step against size and against batch, one line per
    case; dashed: the time the FLOP count predicts from the series' first point."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    cases = list(dict.fromkeys(p.case for p in points))
    panels = [("size", "seconds_per_step", "image size (px)", "s / step"), ("batch", "seconds_per_step", "batch", "s / step"),
              ("size", "peak_memory_gib", "image size (px)", "peak GiB"), ("batch", "peak_memory_gib", "batch", "peak GiB")]
    width, height, margin = 420, 300, 52
    image = Image.new("RGB", (2 * width, 2 * height + 24 * len(cases)), "white")
    draw = ImageDraw.Draw(image)
    for index, (series, field, x_label, y_label) in enumerate(panels):
        left, top = (index % 2) * width, (index // 2) * height
        box = (left + margin, top + 16, left + width - 12, top + height - 40)
        lines = {}
        for name in cases:
            measured = [p for p in points if p.case == name and p.series == series and getattr(p, field) is not None]
            if not measured:
                continue
            x = [p.size if series == "size" else p.batch for p in measured]
            lines[name] = [(xi, getattr(p, field)) for xi, p in zip(x, measured)]
            if field == "seconds_per_step":  # what the FLOP count predicts
                base = measured[0]
                lines[name + " (FLOPs)"] = [(xi, base.seconds_per_step * p.gflop_per_step / base.gflop_per_step) for xi, p in zip(x, measured)]
        values = [v for line in lines.values() for v in line]
        draw.rectangle(box, outline="black")
        draw.text((box[0], box[3] + 22), f"{y_label} against {x_label}", fill="black")
        if not values:
            continue
        x_range = [math.log2(min(v[0] for v in values)), math.log2(max(v[0] for v in values)) + 1e-9]
        y_range = [math.log10(min(v[1] for v in values)) - 0.05, math.log10(max(v[1] for v in values)) + 0.05]

        def to_pixel(x: float, y: float) -> tuple[float, float]:
            fx = (math.log2(x) - x_range[0]) / max(x_range[1] - x_range[0], 1e-9)
            fy = (math.log10(y) - y_range[0]) / (y_range[1] - y_range[0])
            return box[0] + fx * (box[2] - box[0]), box[3] - fy * (box[3] - box[1])

        for x in sorted({v[0] for v in values}):
            px, _ = to_pixel(x, 10 ** y_range[0])
            draw.line([(px, box[3]), (px, box[3] + 4)], fill="black")
            draw.text((px - 8, box[3] + 6), str(x), fill="black")
        for decade in range(math.floor(y_range[0]), math.ceil(y_range[1]) + 1):
            if y_range[0] <= decade <= y_range[1]:
                _, py = to_pixel(2 ** x_range[0], 10.0**decade)
                draw.line([(box[0] - 4, py), (box[2], py)], fill=(225, 225, 225))
                draw.text((left + 4, py - 6), f"{10.0**decade:g}", fill="black")
        for name, line in lines.items():
            colour = colours[cases.index(name.removesuffix(" (FLOPs)")) % len(colours)]
            pixels = [to_pixel(x, y) for x, y in line]
            if name.endswith("(FLOPs)"):
                for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):  # dashed
                    for t in range(0, 10, 2):
                        draw.line([(x0 + (x1 - x0) * t / 10, y0 + (y1 - y0) * t / 10), (x0 + (x1 - x0) * (t + 1) / 10, y0 + (y1 - y0) * (t + 1) / 10)], fill=colour)
            else:
                draw.line(pixels, fill=colour, width=2)
                for px, py in pixels:
                    draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    for i, name in enumerate(cases):
        y = 2 * height + 6 + 24 * i
        draw.line([(margin, y + 7), (margin + 30, y + 7)], fill=colours[i % len(colours)], width=2)
        draw.text((margin + 40, y), f"{name} (dashed: time the FLOP count predicts)", fill="black")
    image.save(path)
    return path


def write_sweep(points: list[SweepPoint], out_dir: Path) -> tuple[Path, Path, Path]:
    """out_dir/sweep.json, sweep.md (the table) and sweep.png (the plot) of this sweep."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / "sweep.json", out_dir / "sweep.md", out_dir / "sweep.png"
    json_path.write_text(json.dumps([asdict(p) for p in points], indent=1))
    md_path.write_text(sweep_table(points))
    sweep_plot(points, png_path)
    return json_path, md_path, png_path
