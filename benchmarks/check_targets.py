"""The GPU targets of issue 18, checked against `icd bench` results: one PASS / FAIL / MISSING line each.

Each target takes the best matching row of bench.json (any fast paths, any dtype), so the line
names the configuration that met it. Exit status 1 when any target is not met.
Usage: python benchmarks/check_targets.py outputs/bench-gpu/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (what, case, size, batch, steps, the row's value, better when, threshold, unit)
TARGETS = [
    ("Prompt Diffusion inference, 512², 50 steps, CFG, batch 1", "prompt_diffusion-infer", 512, 1, 50, lambda r: r["seconds_per_iter"] / r["batch"], "lower", 0.5, "s/image"),
    ("Meta-Prompts depth inference, 512², batch 8, 3 loops", "meta_prompts_depth-infer", 512, 8, 0, lambda r: r["samples_per_s"], "higher", 130.0, "images/s"),
    ("Prompt Diffusion training MFU, 256²", "prompt_diffusion-train", 256, None, 0, lambda r: 100 * (r["mfu"] or 0.0), "higher", 40.0, "% MFU"),
]


def check(rows: list[dict]) -> list[str]:
    lines = []
    for what, case, size, batch, steps, value, better, threshold, unit in TARGETS:
        matching = [r for r in rows if r["case"] == case and r["size"] == size and (batch is None or r["batch"] == batch) and r["steps"] == steps]
        if not matching:
            lines.append(f"MISSING  {what}: no {case} row at {size}px in the results (target {threshold:g} {unit})")
            continue
        best = (min if better == "lower" else max)(matching, key=value)
        met = value(best) <= threshold if better == "lower" else value(best) >= threshold
        target = f"{'≤' if better == 'lower' else '≥'} {threshold:g} {unit}"
        lines.append(f"{'PASS' if met else 'FAIL'}     {what}: {value(best):.3g} {unit} (target {target}; {best['device']}, {best['dtype']}, "
                     f"batch {best['batch']}, fast paths: {best['fast_paths']})")
    return lines


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/bench-gpu/bench.json")
    lines = check(json.loads(path.read_text()))
    print("\n".join(lines))
    sys.exit(0 if all(line.startswith("PASS") for line in lines) else 1)


if __name__ == "__main__":
    main()
