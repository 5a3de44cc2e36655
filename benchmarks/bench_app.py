"""Speed of `icd app` (a benchmark, not a test): time to serve after launch, one depth request at 256x256,
one in-context generation at 64x64 with 20 steps. Targets on 2 CPU cores: 10 s, 3 s, 5 s.

    HF_HUB_OFFLINE=1 python benchmarks/bench_app.py [--model-dir DIR ...] [--out outputs/bench_app.json]

Without --model-dir it serves the shipped zoo (`icd app` with no flags, every tab's model loaded);
when assets/ lacks the Prompt Diffusion or the Meta-Prompts depth model, it first makes the missing
ones on the tiny backbone at 64x64 with the heads' tiny recipes (one training step: speed does not
depend on the weights). Requests go through Gradio's client to `icd app` running in its own process; each figure
is the median of --repeats requests after one warm-up, in wall seconds and in the app process's CPU
seconds (what a loaded machine inflates least).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"ready_s": 10.0, "depth_256_s": 3.0, "in_context_64_20_steps_s": 5.0}


def model_dirs_to_serve(folder: Path) -> list[str]:
    """[] (the shipped zoo) when assets/ holds both models the benchmark asks; else the two, made here where missing."""
    from incontext_diffusion import app
    from incontext_diffusion.core.head import load_head
    from incontext_diffusion.core.trainer import train
    from incontext_diffusion.recipes import load_recipe

    shipped = {capability: folder.path for capability, folder in app.find_models([]).items()}
    if "in_context" in shipped and "depth" in shipped:
        return []
    one_step = ["data.num_samples=4", "train.max_steps=1", "train.batch_size=2", "train.validate_every=100", "train.checkpoint_every=1"]
    if "in_context" not in shipped:
        shipped["in_context"] = train(load_head(load_recipe("prompt_diffusion-tiny", [*one_step, f"output_dir={folder / 'pd'}", "model.validation_steps=1"])))
    if "depth" not in shipped:
        shipped["depth"] = train(load_head(load_recipe("meta_prompts_depth-tiny", [*one_step, f"output_dir={folder / 'depth'}", "data.held_out=2"])))
    return [str(shipped["in_context"]), str(shipped["depth"])]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(pid: int, request, repeats: int) -> tuple[float, float]:
    """(median wall s, median CPU s of the app) of `request()`, after one warm-up call."""
    request()
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, start = cpu_seconds(pid), time.perf_counter()
        request()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_seconds(pid) - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", action="append", default=[], help="A Prompt Diffusion and a Meta-Prompts depth model folder.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_app.json"))
    args = parser.parse_args()

    from gradio_client import Client, handle_file
    from PIL import Image

    from incontext_diffusion.data.synthscenes import render_scene

    work = Path(tempfile.mkdtemp(prefix="bench-app-"))
    model_dirs = args.model_dir or model_dirs_to_serve(work)
    photo = work / "photo_256.png"
    Image.fromarray(render_scene(1_000_001, 256).rgb).save(photo)

    port = free_port()
    command = [sys.executable, "-m", "incontext_diffusion", "app", "--port", str(port)] + [a for d in model_dirs for a in ("--model-dir", d)]
    start = time.perf_counter()
    app = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                if app.poll() is not None:
                    raise SystemExit(f"icd app exited with code {app.returncode}: run `{' '.join(command)}` to see why")
                time.sleep(0.1)
        results = {"ready_s": time.perf_counter() - start, "ready_cpu_s": cpu_seconds(app.pid)}

        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(work / "downloads"))
        results["depth_256_s"], results["depth_256_cpu_s"] = timed(app.pid, lambda: client.predict(handle_file(str(photo)), api_name="/depth"), args.repeats)
        scene = {key: work / f"{key}_64.png" for key in ("source", "target", "query")}  # three held-out scenes, 64x64
        for key, seed in (("source", 1_000_002), ("target", 1_000_003), ("query", 1_000_004)):
            Image.fromarray(render_scene(seed, 64).rgb).save(scene[key])
        pair = [handle_file(str(scene[key])) for key in ("source", "target", "query")]
        results["in_context_64_20_steps_s"], results["in_context_64_20_steps_cpu_s"] = timed(
            app.pid, lambda: client.predict(*pair, "", 20, 4.0, 0, api_name="/in_context"), args.repeats)
    finally:
        app.terminate()
        app.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    results |= {"cpu_cores": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_1min": os.getloadavg()[0],
                "models": model_dirs or "the shipped zoo (assets/)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("| measure | wall s | app CPU s | target s |\n|---|---|---|---|")
    for key, target in TARGETS.items():
        print(f"| {key[:-2]} | {results[key]:.2f} | {results[key[:-2] + '_cpu_s']:.2f} | {target:.0f} |")
    print(f"load average during the run: {results['load_average_1min']:.1f} on {results['cpu_cores']} cores; wrote {args.out}")


if __name__ == "__main__":
    main()
