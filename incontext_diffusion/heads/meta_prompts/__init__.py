"""MetaPrompts: depth and semantic segmentation from a diffusion UNet with meta prompts (arXiv 2312.14733)."""

from .decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead
from .pipeline import (
    MetaPromptsDepthOutput,
    MetaPromptsDepthPipeline,
    MetaPromptsImageProcessor,
    MetaPromptsSegmentationOutput,
    MetaPromptsSegmentationPipeline,
)

__all__ = [
    "MetaPromptsDepthHead",
    "MetaPromptsDepthOutput",
    "MetaPromptsDepthPipeline",
    "MetaPromptsImageProcessor",
    "MetaPromptsSegmentationHead",
    "MetaPromptsSegmentationOutput",
    "MetaPromptsSegmentationPipeline",
]
