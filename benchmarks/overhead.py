"""What the toolkit's machinery costs over bare code, measured side by side in one run (CPU).

1. Trainer: `core.trainer.train` against a bare loop (forward + loss, backward, clip, optimiser
   step) over the same head, data loader and tiny models. Per-step cost = (cost of a 2N-step run -
   cost of an N-step run) / N, so building, data rendering and the final export cancel out.
2. Pipeline: `PromptDiffusionPipeline.__call__` against a bare DDIM + classifier-free-guidance loop
   over the same tiny components (the two give the same image; the script checks it).

Costs are CPU seconds of this process (`time.process_time`), which other jobs on a shared machine
do not inflate the way they inflate wall-clock time; run with OMP_NUM_THREADS=1 for one thread.
Runs alternate (trainer, bare, trainer, bare, ...); the medians over repeats are reported.
Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead.py [--repeats 3] [--steps 20] [--out outputs/bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from incontext_diffusion.core.head import load_head
from incontext_diffusion.core.trainer import make_optimizer, train
from incontext_diffusion.recipes import load_recipe

RECIPE = "prompt_diffusion-tiny"


def recipe(steps: int, run_dir: str):
    return load_recipe(RECIPE, [f"train.max_steps={steps}", f"train.log_every={steps}", f"train.checkpoint_every={steps}",
                                f"train.validate_every={steps}", "data.num_samples=256", f"output_dir={run_dir}"])


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def trainer_run(steps: int) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        train(load_head(recipe(steps, run_dir)))


def bare_run(steps: int) -> None:
    head = load_head(recipe(steps, "unused"))
    torch.manual_seed(head.recipe.seed)
    head.build()
    model, cfg = head.trainable(), head.recipe.train
    optimizer = make_optimizer(head.parameter_groups(model, cfg.learning_rate), cfg)
    loader = torch.utils.data.DataLoader(head.train_dataset(), batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=head.collate)
    step = 0
    while step < steps:
        for batch in loader:
            loss = head.loss(model, batch, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break


def per_step(run, steps: int) -> float:
    """CPU seconds per training step, setup cancelled: (cost(2N) - cost(N)) / N."""
    return (cpu_seconds(lambda: run(2 * steps)) - cpu_seconds(lambda: run(steps))) / steps


def pipeline_inputs():
    head = load_head(recipe(1, "unused"))
    head.build()
    pipe = head.pipeline(head.model)
    triplet = head.validation_triplets[0]
    unit = {key: (triplet[key] + 1) / 2 for key in ("example_source", "example_target", "query")}
    return pipe, unit


@torch.no_grad()
def bare_ddim_cfg(pipe, unit: dict, prompt: str, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """The loop the pipeline wraps, written out: encode, DDIM with CFG (text swapped only), decode."""
    ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    cond, uncond = pipe.text_encoder(ids)[0].chunk(2)
    text = torch.cat([uncond, cond])
    pair = torch.cat([unit["example_source"], unit["example_target"]])[None].repeat(2, 1, 1, 1) * 2 - 1
    query = unit["query"][None].repeat(2, 1, 1, 1) * 2 - 1
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    size = query.shape[-1] // pipe.vae_scale_factor
    latents = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2)
        down, mid = pipe.controlnet(model_input, t, text, controlnet_cond=pair, controlnet_query_cond=query, return_dict=False)
        noise = pipe.unet(model_input, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        noise_uncond, noise_cond = noise.chunk(2)
        latents = scheduler.step(noise_uncond + guidance * (noise_cond - noise_uncond), t, latents).prev_sample
    return (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="N: training runs of N and 2N steps")
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()

    trainer_runs, bare_runs = [], []
    for _ in range(args.repeats):
        trainer_runs.append(per_step(trainer_run, args.steps))
        bare_runs.append(per_step(bare_run, args.steps))

    pipe, unit = pipeline_inputs()
    prompt, guidance = "a large red sphere", 4.0
    call = lambda: pipe(prompt, unit["query"], [unit["example_source"], unit["example_target"]], num_inference_steps=args.inference_steps,
                        guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="pt").images
    bare = lambda: bare_ddim_cfg(pipe, unit, prompt, args.inference_steps, guidance, 0)
    difference = (call() - bare()).abs().max().item()  # the two compute the same image
    pipeline_runs, loop_runs = [], []
    for _ in range(2 * args.repeats + 1):
        pipeline_runs.append(cpu_seconds(call))
        loop_runs.append(cpu_seconds(bare))

    results = {
        "device": f"CPU, {torch.get_num_threads()} threads, process CPU seconds",
        "trainer_s_per_step": statistics.median(trainer_runs),
        "bare_loop_s_per_step": statistics.median(bare_runs),
        "trainer_ratio": statistics.median(trainer_runs) / statistics.median(bare_runs),
        "pipeline_s": statistics.median(pipeline_runs),
        "bare_ddim_cfg_s": statistics.median(loop_runs),
        "pipeline_ratio": statistics.median(pipeline_runs) / statistics.median(loop_runs),
        "pipeline_vs_bare_max_abs_diff": difference,
        "runs": {"trainer": trainer_runs, "bare_loop": bare_runs, "pipeline": pipeline_runs, "bare_ddim_cfg": loop_runs},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(results, indent=1))
    print(f"trainer / bare loop: {results['trainer_s_per_step']:.4f} / {results['bare_loop_s_per_step']:.4f} s per step = {results['trainer_ratio']:.3f}")
    print(f"pipeline / bare DDIM+CFG: {results['pipeline_s']:.4f} / {results['bare_ddim_cfg_s']:.4f} s = {results['pipeline_ratio']:.3f} (max |diff| {difference:.2e})")


if __name__ == "__main__":
    main()
