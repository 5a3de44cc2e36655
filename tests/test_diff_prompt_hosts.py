"""Diff-Prompt stage 3: prompt injection into Swin/BERT hosts (tiny host and a tiny Grounding DINO)."""

import pytest
import torch
from transformers import BertConfig, SwinConfig
from transformers.models.swin.modeling_swin import SwinLayer

from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.diff_prompt.hosts import GroundingDinoHost, TinyGroundingHost, extend_mask, fit_tokens, load_host
from incontext_diffusion.heads.diff_prompt.pipeline import StagePrompts
from incontext_diffusion.heads.diff_prompt.tiny import tiny_grounding_dino, write_bert_tokenizer

torch.set_num_threads(1)  # the 2 shared cores are busy: one thread is much faster here
TEXTS = ["the red cube", "the leftmost sphere"]
BOXES = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.3, 0.9, 0.8]])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_bert_tokenizer(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tiny_host(tokenizer):
    torch.manual_seed(0)
    # Stage 1: 8x8 tokens in 4x4 windows, the second block shifted (shift mask); stage 2: 4x4 tokens.
    swin = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4)
    bert = BertConfig(vocab_size=2048, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
    return TinyGroundingHost.from_configs(swin, bert, tokenizer, head_dim=8).eval()


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    torch.manual_seed(0)
    # 128 px: at batch 1 the coarsest feature level must keep more than one pixel (GroupNorm).
    model, tokenizer = tiny_grounding_dino(tmp_path_factory.mktemp("dino_tok"), image_size=128)
    return GroundingDinoHost(model, tokenizer, image_size=128).eval()


def prompts_for(host, batch: int, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vision = [torch.randn(batch, length, host.vision_dims[0], generator=g) for _ in host.vision_blocks]
    text = [torch.randn(batch, length, host.text_dim, generator=g) for _ in host.text_layers]
    return vision, text


def images(batch: int = 2):
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def run(host, vision=None, text=None, x=None, texts=TEXTS, paper_compat=False):
    x = images(len(texts)) if x is None else x
    with torch.no_grad(), host.prompted(vision, text, paper_compat):
        return host(host.preprocess(x), texts)


@pytest.mark.parametrize("name", ["tiny_host", "dino"])
def test_depth_zero_reproduces_the_unprompted_host_exactly(name, request, tokenizer):
    host = request.getfixturevalue(name)
    plain = run(host)
    assert torch.equal(run(host, [], []).logits, plain.logits) and torch.equal(run(host, [], []).boxes, plain.boxes)
    prompted = run(host, *prompts_for(host, 2))
    assert not torch.allclose(prompted.logits, plain.logits, atol=1e-4)


def test_unwrapped_host_matches(tiny_host, tokenizer):
    """The wrappers without prompts are the original modules: same output as a host never injected."""
    from incontext_diffusion.heads.diff_prompt import hosts

    fresh = TinyGroundingHost.from_configs(tiny_host.swin.config, tiny_host.bert.config, tokenizer, head_dim=8).eval()
    fresh.load_state_dict(tiny_host.state_dict())
    assert torch.equal(run(fresh).logits, run(tiny_host).logits)
    assert all(isinstance(b, hosts.PromptedSwinAttention) for b in tiny_host.vision_blocks)


@pytest.mark.parametrize("name", ["tiny_host", "dino"])
def test_sequence_lengths_unchanged_after_every_layer(name, request):
    host = request.getfixturevalue(name)
    shapes = {}

    def record(key):
        def hook(module, args, output):
            shapes.setdefault(key, []).append(tuple((output[0] if isinstance(output, tuple) else output).shape))
        return hook

    # What the next layer sees: Swin blocks and their attention, and the BERT layers as the encoder calls them.
    layers = [m for m in host.modules() if isinstance(m, SwinLayer)] + host.vision_blocks + host.text_layers
    handles = [m.register_forward_hook(record(f"{type(m).__name__}{i}")) for i, m in enumerate(layers)]
    run(host)
    run(host, *prompts_for(host, 2))
    for handle in handles:
        handle.remove()
    assert shapes and all(len(v) == 2 and v[0] == v[1] for v in shapes.values()), shapes
    assert all(b.prompts is None for b in host.vision_blocks) and all(t.prompts is None for t in host.text_layers)


@pytest.mark.parametrize("name", ["tiny_host", "dino"])
def test_per_sample_prompt_alignment(name, request):
    """Swapping two samples' prompts swaps their outputs; each sample matches its single run."""
    host = request.getfixturevalue(name)
    x = images(1).expand(2, -1, -1, -1)
    same_texts = [TEXTS[0], TEXTS[0]]
    (v0, t0), (v1, t1) = prompts_for(host, 1, seed=1), prompts_for(host, 1, seed=2)
    both = run(host, [torch.cat(p) for p in zip(v0, v1)], [torch.cat(p) for p in zip(t0, t1)], x, same_texts)
    swapped = run(host, [torch.cat(p) for p in zip(v1, v0)], [torch.cat(p) for p in zip(t1, t0)], x, same_texts)
    assert not torch.allclose(both.logits[0], both.logits[1], atol=1e-4)
    assert torch.allclose(both.logits[0], swapped.logits[1], atol=1e-4) and torch.allclose(both.logits[1], swapped.logits[0], atol=1e-4)
    single = run(host, v0, t0, x[:1], same_texts[:1])
    assert torch.allclose(both.logits[0], single.logits[0], atol=1e-4)
    assert torch.allclose(both.boxes[0], single.boxes[0], atol=1e-4)
    # The official tiling (`repeat`) hands sample 0 some of sample 1's prompts: this test exists to catch it.
    mixed = run(host, [torch.cat(p) for p in zip(v0, v1)], [], x, same_texts, paper_compat=True)
    alone = run(host, v0, [], x[:1], same_texts[:1])
    assert not torch.allclose(mixed.logits[0], alone.logits[0], atol=1e-4)


@pytest.mark.parametrize("method", ["diff_prompt", "vpt_deep", "coop_deep"])
def test_only_prompt_parameters_get_gradients(tiny_host, method):
    host = tiny_host.requires_grad_(False)
    prompts = StagePrompts(method, depth=2, prompt_length=4, vision_dim=host.vision_dims[0], text_dim=host.text_dim, mask_size=32, base_channels=2)
    masks = [torch.rand(2, 1, 32, 32) for _ in range(2)]
    vision, text = prompts(2, masks if method == "diff_prompt" else None)
    with host.prompted(vision, text):
        loss = host(host.preprocess(images()), TEXTS, BOXES).loss
    loss.backward()
    assert all(p.grad is None for p in host.parameters())
    trained = [p for p in prompts.parameters()]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    if method == "vpt_deep":
        assert prompts.text is None
    if method == "coop_deep":
        assert prompts.vision is None


def test_dino_prompts_get_gradients_and_host_does_not(dino):
    dino.requires_grad_(False)
    vision, text = prompts_for(dino, 2)
    vision = [v.requires_grad_(True) for v in vision]
    text = [t.requires_grad_(True) for t in text]
    with dino.prompted(vision, text):
        out = dino(dino.preprocess(images()), TEXTS, BOXES)
    out.loss.backward()
    assert all(p.grad is None for p in dino.parameters())
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vision + text)


def test_reshape_and_mask_helpers():
    tokens = torch.arange(2 * 8 * 4, dtype=torch.float32).view(2, 8, 4)
    merged = fit_tokens(tokens, 8)
    assert merged.shape == (2, 4, 8) and torch.equal(merged[0, 0], torch.cat([tokens[0, 0], tokens[0, 1]]))
    with pytest.raises(UserError, match="prompt length"):
        fit_tokens(torch.zeros(1, 3, 4), 8)
    mask = torch.tensor([[[[True, False]]]])
    assert extend_mask(mask, 2).tolist() == [[[[True, True, True, False]]]]
    square = torch.zeros(1, 1, 2, 2)
    square[..., 1] = float("-inf")
    grown = extend_mask(square, 1)
    assert grown.shape == (1, 1, 3, 3) and grown[0, 0, 0].tolist() == [0, 0, 0] and grown[0, 0, 1, 2] == float("-inf")


def test_depth_beyond_the_host_is_a_user_error(tiny_host):
    vision, _ = prompts_for(tiny_host, 2)
    with pytest.raises(UserError, match="exceeds"):
        with tiny_host.prompted(vision * 3, []):
            pass


def test_host_round_trip(tiny_host, tmp_path):
    tiny_host.save_pretrained(tmp_path / "host")
    loaded = load_host(tmp_path).eval()  # an exported model folder holding host/
    assert torch.equal(run(loaded).logits, run(tiny_host).logits)
    with pytest.raises(UserError, match="neither"):
        load_host("no_such_host")


def test_grounding_dino_round_trip(dino, tmp_path):
    """The wrappers' `.inner.` keys are saved under transformers' own names and load back."""
    dino.save_pretrained(tmp_path / "host")
    loaded = load_host(tmp_path).eval()
    assert isinstance(loaded, GroundingDinoHost)
    assert torch.equal(run(loaded).logits, run(dino).logits)
