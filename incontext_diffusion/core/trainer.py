"""One Accelerate training loop for every head.

The loop follows diffusers' `train_controlnet.py`, with the fixes its users asked for: checkpoints
saved on every rank (DeepSpeed's save is collective) and pruned on rank 0, resume that skips the
batches already seen (`skip_first_batches`) so a resumed run ends with the same weights, LR
warm-up scaled by the number of processes, trainable weights kept in fp32 under mixed precision,
and a NaN guard that names the step and the last good checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, gather_object, set_seed
from diffusers import ModelMixin
from diffusers.models.attention_processor import AttnProcessor
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .cache import load_cache
from .shards import ShardStream
from ..errors import UserError
from .checkpoints import RunLock, atomic_export, clean_stale_temps, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint, write_model_card
from .head import Head
from .images import save_image

MAX_SKIPPED_IN_A_ROW = 10  # with train.on_nan=skip: a run that only produces NaN stops anyway


def make_optimizer(params: list[dict], recipe_train) -> torch.optim.Optimizer:
    """AdamW as `train.optimizer` asks: PyTorch's (multi-tensor or fused) or bitsandbytes' 8-bit one."""
    kwargs = dict(
        lr=recipe_train.learning_rate,
        betas=(recipe_train.adam_beta1, recipe_train.adam_beta2),
        eps=recipe_train.adam_epsilon,
        weight_decay=recipe_train.weight_decay,
    )
    if recipe_train.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("train.optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes, or choose adamw / adamw_fused") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=recipe_train.optimizer == "adamw_fused", **kwargs)


def diffusers_models(modules: list[torch.nn.Module]) -> list[ModelMixin]:
    """The outermost diffusers models inside `modules` (UNet, ControlNet, VAE, DiT, heads)."""
    found: list[ModelMixin] = []

    def visit(module: torch.nn.Module) -> None:
        if isinstance(module, ModelMixin):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    for module in modules:
        visit(module)
    return list({id(m): m for m in found}.values())


def apply_fast_paths(modules: list[torch.nn.Module], recipe_train) -> None:
    """The recipe's speed switches, in place: TF32, channels_last, attention kernels, torch.compile.
    Parameter names are unchanged (Module.compile wraps forward), so checkpoints and exports are too."""
    torch.backends.cuda.matmul.allow_tf32 = recipe_train.allow_tf32
    torch.backends.cudnn.allow_tf32 = recipe_train.allow_tf32
    for model in diffusers_models(modules):
        if recipe_train.attention == "eager" and hasattr(model, "set_attn_processor"):
            model.set_attn_processor(AttnProcessor())  # softmax(QK^T)V in plain matmuls
        if recipe_train.channels_last:
            model.to(memory_format=torch.channels_last)
        if recipe_train.compile:
            options = {"mode": recipe_train.compile_mode} if recipe_train.compile_backend == "inductor" else {}
            model.compile(backend=recipe_train.compile_backend, **options)


def place_frozen(modules: list[torch.nn.Module], device: torch.device, weight_dtype: torch.dtype) -> None:
    """Frozen modules: no gradients, on the device, in the half dtype under mixed precision."""
    for module in modules:
        module.requires_grad_(False)
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)


def progress_bar(disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.2f} it/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=disable,
    )


def train(head: Head, resume: str | None = None) -> Path:
    """Train `head` as its recipe says; return the exported model dir (run_dir/model)."""
    recipe = head.recipe
    cfg = recipe.train
    run_dir = recipe.run_dir()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # The shuffle order is a function of (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=head.has_unused_parameters)],
    )
    # One training per run folder; what a killed run left half-written goes once the folder is ours.
    lock = RunLock(run_dir).acquire() if accelerator.is_main_process else None
    if lock is not None:
        clean_stale_temps(run_dir)
    accelerator.wait_for_everyone()
    checkpoint = resolve_resume(run_dir, resume, say=accelerator.print) if resume else None
    if checkpoint is None and list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume latest, or another output_dir (--set output_dir=...)")
    set_seed(recipe.seed)

    head.build()
    model = head.trainable()
    model.train()
    if cfg.gradient_checkpointing:
        head.enable_gradient_checkpointing()
    apply_fast_paths([model, *head.frozen()], cfg)
    optimizer = make_optimizer(head.parameter_groups(model, cfg.learning_rate), cfg)
    # The prepared scheduler steps once per process, so its horizon is scaled likewise (diffusers PR #8312).
    head_factor = head.lr_lambda(cfg.max_steps)
    if head_factor is not None:
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda count: head_factor(count // accelerator.num_processes))
    else:
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=cfg.max_steps * accelerator.num_processes,
        )
    if recipe.data.shards:
        # Each process streams its own shards; prepare() passes the stream through (it is no DataLoader).
        dataloader = ShardStream(recipe.data.shards, head, accelerator.process_index, accelerator.num_processes, accelerator.device)
    else:
        dataset = load_cache(recipe.data.cache, head) if recipe.data.cache else head.train_dataset()
        if len(dataset) < cfg.batch_size * accelerator.num_processes:
            raise UserError(f"the dataset has {len(dataset)} samples, fewer than one batch ({cfg.batch_size}): lower train.batch_size or add data")
        dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=head.collate,
            num_workers=recipe.data.num_workers,
            generator=torch.Generator().manual_seed(recipe.seed),
        )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    place_frozen(head.frozen(), accelerator.device, weight_dtype)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay) if cfg.ema else None
    if ema is not None:
        ema.to(accelerator.device)

    step, batches_seen = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, ema)
        step, batches_seen = state["step"], state["batches_seen"]
        if isinstance(dataloader, ShardStream):
            dataloader.load_state_dict(state.get("data"))
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    last_good = str(checkpoint) if checkpoint else None

    if accelerator.is_main_process:
        accelerator.init_trackers(recipe.name, config={"recipe": recipe.name, "head": recipe.head, **cfg.model_dump()})
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.jsonl"
    if isinstance(dataloader, ShardStream):
        epoch, skip = dataloader.epoch, 0  # the stream restored its own position
    else:
        epoch, skip = divmod(batches_seen, len(dataloader))
    window_is_bad, skipped_batches, skipped_in_a_row = False, 0, 0
    window_start, window_steps = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0

    with progress_bar(disable=not accelerator.is_local_main_process) as progress:
        task = progress.add_task(recipe.name, total=cfg.max_steps, completed=step, loss=float("nan"), rate=0.0)
        while step < cfg.max_steps:
            dataloader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            for batch in batches:
                batches_seen += 1
                with accelerator.accumulate(model):
                    loss = head.loss(model, batch, step)
                    finite = bool(torch.isfinite(accelerator.gather(loss.detach())).all())
                    if finite:
                        accelerator.backward(loss)
                        loss_sum += loss.detach()
                        loss_count += 1
                    elif cfg.on_nan == "stop":
                        raise UserError(
                            f"the loss became {loss.item()} at step {step + 1}: last good checkpoint: {last_good or 'none yet'} (intact); "
                            "lower train.learning_rate, check the data, or set train.on_nan=skip"
                        )
                    else:
                        window_is_bad = True
                    if accelerator.sync_gradients and not window_is_bad:
                        if cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                if window_is_bad:
                    window_is_bad, skipped_batches, skipped_in_a_row = False, skipped_batches + 1, skipped_in_a_row + 1
                    accelerator.print(f"skipped a non-finite batch at step {step + 1} ({skipped_batches} so far)")
                    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        raise UserError(f"{skipped_in_a_row} non-finite losses in a row at step {step + 1}: last good checkpoint: {last_good or 'none yet'}; lower train.learning_rate or check the data")
                    continue
                skipped_in_a_row = 0
                step += 1
                window_steps += 1
                if ema is not None:
                    ema.step(accelerator.unwrap_model(model).parameters())

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "loss": mean_loss,
                        "lr": lr_scheduler.get_last_lr()[0],
                        "steps_per_s": window_steps / elapsed,
                        "samples_per_s": window_steps * cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes / elapsed,
                        "skipped_batches": skipped_batches,
                    }
                    accelerator.log(record, step=step)
                    if accelerator.is_main_process:
                        with metrics_file.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                    progress.update(task, loss=mean_loss, rate=record["steps_per_s"])
                    if accelerator.is_local_main_process and not progress.console.is_terminal:
                        progress.console.print(f"step {step}/{cfg.max_steps} loss {mean_loss:.4f} {record['steps_per_s']:.2f} it/s")
                    loss_sum.zero_()
                    loss_count, window_start, window_steps = 0, time.perf_counter(), 0
                progress.update(task, completed=step)

                if step % cfg.validate_every == 0 or step == cfg.max_steps:
                    run_validation(accelerator, head, model, step, run_dir)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    state = {"step": step, "batches_seen": batches_seen, "epoch": epoch}
                    if isinstance(dataloader, ShardStream):
                        state["data"] = gather_object([dataloader.state_dict()])  # one entry per process
                    last_good = str(save_checkpoint(accelerator, run_dir, step, state, ema, keep=cfg.keep_checkpoints))
                if step >= cfg.max_steps:
                    break
            epoch, skip = epoch + 1, 0

    out_dir = run_dir / "model"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if ema is not None:
            ema.store(unwrapped.parameters())
            ema.copy_to(unwrapped.parameters())

        def write(temp: Path) -> None:
            head.export(unwrapped, temp)
            write_model_card(temp, recipe, head.model_card())

        atomic_export(out_dir, write)
        if ema is not None:
            ema.restore(unwrapped.parameters())
    accelerator.end_training()
    if lock is not None:
        lock.release()
    return out_dir


def run_validation(accelerator: Accelerator, head: Head, model: torch.nn.Module, step: int, run_dir: Path) -> None:
    """Main process only: save the head's picture under run_dir/samples and log it."""
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    # Validation draws its own randomness; the training RNG must not notice (resume equality).
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        picture = head.validate(unwrapped, step)
    unwrapped.train()
    if picture is None:
        return
    save_image(picture, run_dir / "samples" / f"step-{step:06d}.png", overwrite=True)  # a resumed run redraws its step
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        tracker.add_image("validation", np.asarray(picture.convert("RGB")), step, dataformats="HWC")

