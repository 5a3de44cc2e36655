"""Throughput of the synthetic-scene renderer, in scenes per second on one core.

Measures `render_scene` alone and `write_dataset` (render + six PNGs + metadata) at 64x64 and
256x256, prints a Markdown table and, with --out, writes the figures as JSON.

    python benchmarks/bench_synthscenes.py [--scenes 300] [--out bench_synthscenes.json]
"""

import os

# One core, as in one data-loader worker (set before numpy loads its BLAS).
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from incontext_diffusion.data.synthscenes import render_scene, write_dataset  # noqa: E402

RESOLUTIONS = (64, 256)


def scenes_per_second(count: int, work) -> float:
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=300, help="scenes at 64x64 (a sixteenth at 256x256)")
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    results = []
    for size in RESOLUTIONS:
        count = max(10, args.scenes * 64 * 64 // (size * size))
        render_scene(0, size)  # warm-up: imports, first allocations
        render = scenes_per_second(count, lambda: [render_scene(seed, size) for seed in range(count)])
        with tempfile.TemporaryDirectory() as folder:
            write = scenes_per_second(
                count, lambda: write_dataset(Path(folder) / "scenes", count, size, progress=False))
        results.append({"size": size, "scenes": count, "render_scenes_per_s": round(render, 1),
                        "render_and_write_scenes_per_s": round(write, 1)})

    print("| resolution | scenes | render (scenes/s) | render + write (scenes/s) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['size']}x{r['size']} | {r['scenes']} | {r['render_scenes_per_s']} "
              f"| {r['render_and_write_scenes_per_s']} |")
    if args.out:
        report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                  "results": results}
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
