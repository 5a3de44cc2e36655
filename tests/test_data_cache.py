"""`icd data cache`: training from precomputed latents and text embeddings equals training online."""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from incontext_diffusion.core.head import load_head
from incontext_diffusion.core.trainer import train
from incontext_diffusion.core.cache import load_cache, write_cache
from incontext_diffusion.errors import UserError
from incontext_diffusion.recipes import load_recipe

SETTINGS = ["data.size=32", "data.num_samples=8", "train.batch_size=4", "train.max_steps=2",
            "train.checkpoint_every=2", "train.validate_every=100", "train.log_every=1", "model.validation_steps=1"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "pd"
    head = load_head(load_recipe("prompt_diffusion-tiny", SETTINGS))
    assert write_cache(head, folder, batch_size=4) == 8
    return head, folder


def test_cached_batches_give_the_online_loss(cached):
    head, folder = cached
    dataset = load_cache(folder, head)
    assert len(dataset) == 8 and dataset[0]["latent_moments"].shape == (8, 8, 8)  # mean and log-variance of 4x8x8 latents
    online = head.collate([head.train_dataset()[i] for i in range(4)])
    from_cache = head.collate([dataset[i] for i in range(4)])
    for key in ("example_source", "example_target", "query", "target"):
        assert torch.equal(from_cache[key], online[key])  # uint8 storage is exact
    model = head.trainable()
    losses = []
    for batch in (online, from_cache):
        torch.manual_seed(3)  # the same dropout, posterior sample, noise and timesteps
        with torch.no_grad():
            losses.append(head.loss(model, batch, 0))
    assert losses[0] > 0
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0]


def test_training_streams_the_cache(cached, tmp_path):
    head, folder = cached
    out = train(load_head(load_recipe("prompt_diffusion-tiny", SETTINGS + [f"data.cache={folder}", f"output_dir={tmp_path / 'run'}"])))
    assert (out / "controlnet").is_dir()


def test_a_cache_for_another_size_is_refused(cached):
    head, folder = cached
    other = load_head(load_recipe("prompt_diffusion-tiny", SETTINGS[1:] + ["data.size=64"]))
    with pytest.raises(UserError, match="was written for head prompt_diffusion, backbone tiny, size 32"):
        load_cache(folder, other)


def test_writing_over_an_existing_folder_is_refused(cached):
    head, folder = cached
    with pytest.raises(UserError, match="already exists"):
        write_cache(head, folder)


def test_a_head_without_cache_support_says_so():
    head = load_head(load_recipe("meta_prompts_depth-tiny"))
    with pytest.raises(UserError, match="the meta_prompts head has nothing to cache"):
        head.cache_features({})
