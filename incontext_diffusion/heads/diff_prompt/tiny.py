"""Offline stand-ins for the hub models of Diff-Prompt: tiny CLIP, BERT tokenizer and hosts, built from configs.

No hub weights are needed: the tiny recipes train these from scratch on synthetic scenes. The BERT
vocabulary keeps bert-base-uncased's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
[MASK] 103, "." 1012, "?" 1029), which Grounding DINO hard-codes; other slots are `[unusedN]`.
"""

from __future__ import annotations

from pathlib import Path

from ...core import tiny as core_tiny
from ...data.synthscenes import caption_vocabulary
from ...errors import UserError

BERT_SPECIAL_IDS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
BERT_VOCAB_SIZE = 2048


def write_bert_tokenizer(out_dir: Path, words: list[str] | None = None):
    """A BertTokenizer over the synthetic-scene words with bert-base-uncased's special ids."""
    from transformers import BertTokenizer

    words = list(words or caption_vocabulary())
    vocab = [BERT_SPECIAL_IDS.get(i) for i in range(BERT_VOCAB_SIZE)]
    free = iter(i for i in range(104, BERT_VOCAB_SIZE) if vocab[i] is None)
    for word in words:
        vocab[next(free)] = word
    vocab = [token or f"[unused{i}]" for i, token in enumerate(vocab)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(out_dir / "vocab.txt"), do_lower_case=True, model_max_length=32)


def tiny_clip(projection_dim: int, image_size: int, tokenizer_dir: Path, width: int = 64, layers: int = 2, heads: int = 2):
    """A randomly initialised CLIPModel with small towers and the synthetic-scene CLIPTokenizer."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = core_tiny.write_tokenizer(caption_vocabulary(), Path(tokenizer_dir))
    vocab_size = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
            patch_size=max(image_size // 8, 1),
        ),
        projection_dim=projection_dim,
    )
    return CLIPModel(config), tokenizer


def tiny_clip_with_backbone_text(backbone: str | Path, projection_dim: int, image_size: int, width: int = 64, layers: int = 2, heads: int = 2):
    """A CLIPModel whose text tower (and tokenizer) are the tiny backbone's, which were pre-trained on
    scene captions: the tiny stand-in for a pre-trained CLIP text encoder. The vision tower and both
    projections are freshly initialised."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

    backbone = Path(backbone)
    if not (backbone / "text_encoder").is_dir() or not (backbone / "tokenizer").is_dir():
        raise UserError(f"{backbone} has no text_encoder/ and tokenizer/: pass a diffusers backbone folder such as assets/tiny-ldm")
    text_encoder = CLIPTextModel.from_pretrained(str(backbone / "text_encoder"))
    config = CLIPConfig(
        text_config=text_encoder.config.to_dict(),
        vision_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
            patch_size=max(image_size // 8, 1),
        ),
        projection_dim=projection_dim,
    )
    clip = CLIPModel(config)
    clip.text_model.load_state_dict(text_encoder.state_dict())  # transformers 5: CLIPTextModel holds the tower directly
    return clip, CLIPTokenizer.from_pretrained(str(backbone / "tokenizer"))


def tiny_host_configs(image_size: int = 64, embed_dim: int = 32, depths=(2, 2), heads=(2, 4), window: int = 4, bert_width: int = 32, bert_layers: int = 4,
                      absolute_positions: bool = False):
    """Swin and BERT configs of the CPU demo host (`TinyGroundingHost`); `absolute_positions` adds Swin's learned absolute
    position embedding (off in Swin-T and GLIP: a window then cannot tell where in the image it is)."""
    from transformers import BertConfig, SwinConfig

    swin = SwinConfig(image_size=image_size, patch_size=4, embed_dim=embed_dim, depths=list(depths), num_heads=list(heads), window_size=window,
                      use_absolute_embeddings=absolute_positions)
    bert = BertConfig(
        vocab_size=BERT_VOCAB_SIZE, hidden_size=bert_width, num_hidden_layers=bert_layers, num_attention_heads=2,
        intermediate_size=2 * bert_width, max_position_embeddings=32,
    )
    return swin, bert


def tiny_grounding_dino(tokenizer_dir: Path, image_size: int = 128):
    """A ~1 M-parameter random GroundingDinoForObjectDetection (the spec's tested tiny shape) and its tokenizer."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    swin = SwinConfig(
        image_size=image_size, patch_size=4, embed_dim=24, depths=[1, 1, 2, 1], num_heads=[2, 4, 8, 8], window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    bert = BertConfig(vocab_size=BERT_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    config = GroundingDinoConfig(
        backbone_config=swin, text_config=bert, d_model=32, num_queries=10, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=2,
        num_feature_levels=4, max_text_len=32,
    )
    return GroundingDinoForObjectDetection(config), write_bert_tokenizer(tokenizer_dir)
