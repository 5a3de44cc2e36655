"""Build or load the latent-diffusion backbone: VAE, UNet, text encoder, tokenizer, noise scheduler.

A backbone is named by one string:
- `tiny`: the embedded model in `assets/tiny-ldm` (the stand-in for SD1.5 offline and on a CPU);
- `random-sd15`: SD1.5's architecture with random weights (benchmarks and smoke tests at real size);
- a local diffusers-format folder (`model_index.json` or `unet/`, `vae/`, ... subfolders);
- a single-file SD checkpoint (`.safetensors`, or `.ckpt` read with `weights_only=True`; a
  checkpoint that needs unpickling is refused unless `trust_pickle=True`);
- a hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`, from the local cache or the hub.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import UserError
from .backbone import Components, token_ids  # noqa: F401 (re-exported: the heads import them from here)
from .hub import hub_reachable

TINY_LDM = Path(__file__).resolve().parent.parent.parent / "assets" / "tiny-ldm"


def _is_hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)


# Components a model_index.json lists that hold no weights (configs, vocabularies).
WEIGHTLESS_SUFFIXES = ("Tokenizer", "TokenizerFast", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_folder(folder: Path, trust_pickle: bool = False) -> None:
    """One model component (`unet/`, `vae/`, ...) is complete: a config and readable safetensors weights.

    Pickled weights (`.bin`) are refused unless `trust_pickle`: loading them can run code.
    """
    from safetensors import safe_open

    if not folder.is_dir():
        raise UserError(f"{folder} is missing: the model folder is incomplete: copy or re-export the whole folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder / 'config.json'} is missing: the model folder is incomplete: copy or re-export the whole folder")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("*.safetensors.index.json")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled and trust_pickle:
            return
        if pickled:
            raise UserError(f"{folder / pickled[0]} holds pickled weights, which can run code when loaded: "
                            "re-save the model with safetensors (save_pretrained(..., safe_serialization=True)), or pass --trust-pickle if you trust its source")
        expected = "model.safetensors" if (folder / "config.json").read_text().find('"architectures"') >= 0 else "diffusion_pytorch_model.safetensors"
        raise UserError(f"{folder / expected} is missing: the model folder has no weights there: copy or re-export the whole folder")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):  # reads the header only; checks it against the file size
                pass
        except Exception as error:  # safetensors raises its own error type for a truncated or foreign file
            raise UserError(f"{file} is not a readable safetensors file ({str(error).splitlines()[0]}): copy or re-export it") from None


def check_model_files(model_dir: Path, trust_pickle: bool = False) -> None:
    """Every weight-bearing component that `model_index.json` lists is present and readable.

    Folders whose model_index.json lists no diffusers/transformers components (each head's own
    layout) are checked by their head's loader.
    """
    import json

    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # no or broken model_index.json: `read_model_folder` names that problem
    for name, entry in index.items() if isinstance(index, dict) else ():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        library, class_name = entry
        if library in ("diffusers", "transformers") and not class_name.endswith(WEIGHTLESS_SUFFIXES):
            check_weights_folder(Path(model_dir) / name, trust_pickle)
        elif not (Path(model_dir) / name).is_dir():
            raise UserError(f"{Path(model_dir) / name} is missing: the model folder is incomplete: copy or re-export the whole folder")


def _from_folder(root: str, local_only: bool, trust_pickle: bool = False) -> Components:
    if Path(root).is_dir():  # a local folder: name a missing or broken file before diffusers trips on it
        for name in ("vae", "unet", "text_encoder"):
            check_weights_folder(Path(root) / name, trust_pickle)
    # Safetensors only: a folder of .bin weights is unpickled only when the user trusts it.
    kwargs = {"local_files_only": local_only, "use_safetensors": None if trust_pickle else True}
    try:
        return Components(
            vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **kwargs),
            unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=local_only),
            noise_scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=local_only),
            source=str(root),
        )
    except (OSError, ValueError) as error:  # diffusers and transformers report a missing file as OSError
        raise UserError(f"{root} could not be loaded ({str(error).splitlines()[0]}): check that the folder is complete, or re-export it") from None


def check_no_pickle_needed(path: Path, trust_pickle: bool) -> None:
    """A `.ckpt` must load with `weights_only=True` unless the user trusts it."""
    if trust_pickle:
        return
    try:
        torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} needs unpickling, which can run code from the file: pass --trust-pickle only if you trust its source") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{path} is not a readable checkpoint ({type(err).__name__}): check the file") from None


def read_checkpoint_tensors(path: Path, trust_pickle: bool = False, pick: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file, or of a torch checkpoint (its first entry among `pick` that
    is a dict, else the whole dict), read with weights_only unless the user trusts the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    check_no_pickle_needed(path, trust_pickle)
    loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    if isinstance(loaded, dict):
        loaded = next((loaded[k] for k in pick if isinstance(loaded.get(k), dict)), loaded)
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds no state dict: pass the released checkpoint")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def check_safetensors_file(path: Path) -> None:
    """A `.safetensors` file whose header reads (a truncated or foreign file fails here, not later)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # safetensors' own error type, or OSError
        raise UserError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]}): check the file or download it again") from None


def _from_single_file(path: Path, config: str | None, trust_pickle: bool) -> Components:
    if path.suffix == ".safetensors":
        check_safetensors_file(path)
    else:
        check_no_pickle_needed(path, trust_pickle)
    # The single file holds weights only; the component configs come from `config` (a diffusers
    # folder or hub id), which diffusers otherwise fetches from the hub for the detected model type.
    kwargs = {"config": config, "local_files_only": config is not None and Path(config).is_dir()}
    if trust_pickle:
        kwargs["weights_only"] = False
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, **kwargs)
    except (OSError, ValueError) as err:
        if not hub_reachable():
            raise UserError(f"{path}: the component configs are not on this machine and the hub is unreachable: pass --config LOCAL_DIFFUSERS_FOLDER") from None
        raise UserError(f"{path} could not be read as a Stable Diffusion checkpoint: {str(err).splitlines()[0]}") from None
    return Components(
        vae=pipe.vae,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=str(path),
    )


def load_components(backbone: str = "tiny", *, config: str | None = None, trust_pickle: bool = False) -> Components:
    """Load the backbone a recipe names (see the module docstring for the accepted forms)."""
    if backbone == "tiny":
        if not (TINY_LDM / "model_index.json").is_file():
            raise UserError(f"the embedded backbone {TINY_LDM} is missing: rebuild it with `icd train --recipe tiny_ldm`")
        return _from_folder(str(TINY_LDM), local_only=True)
    if backbone == "random-sd15":
        from .tiny import random_sd15_components

        return random_sd15_components(TINY_LDM / "tokenizer")
    path = Path(backbone).expanduser()
    if path.is_dir():
        if not ((path / "model_index.json").is_file() or (path / "unet").is_dir()):
            raise UserError(f"{path} is not a diffusers model folder (no model_index.json or unet/): pass a diffusers folder, a checkpoint file or a hub id")
        return _from_folder(str(path), local_only=True, trust_pickle=trust_pickle)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        if not path.is_file():
            raise UserError(f"checkpoint file {path} does not exist: check the path")
        return _from_single_file(path, config, trust_pickle)
    if backbone.count("/") != 1 or backbone.startswith((".", "/", "~")):
        raise UserError(f"backbone '{backbone}' is neither 'tiny', 'random-sd15', an existing folder or file, nor a hub id like org/name")
    if _is_hub_cached(backbone):
        return _from_folder(backbone, local_only=True, trust_pickle=trust_pickle)
    if not hub_reachable():
        raise UserError(f"weights for {backbone} are not on this machine and the hub is unreachable: pass a local folder or use backbone: tiny")
    return _from_folder(backbone, local_only=False, trust_pickle=trust_pickle)


def text_to_image_pipeline(components: Components, scheduler=None) -> StableDiffusionPipeline:
    """The components as a plain diffusers text-to-image pipeline (no safety checker)."""
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler or DDIMScheduler.from_config(components.noise_scheduler.config, set_alpha_to_one=False, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_components(components: Components, out_dir: Path) -> None:
    """Write the components as a diffusers folder (safetensors), atomically."""
    from .checkpoints import atomic_export

    if Path(out_dir).exists():
        raise UserError(f"{out_dir} already exists: choose a new output folder")
    atomic_export(Path(out_dir), lambda temp: text_to_image_pipeline(components).save_pretrained(str(temp), safe_serialization=True))
