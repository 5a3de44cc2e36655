"""The one shape check every metric makes before comparing a prediction with its reference."""

import torch

from incontext_diffusion.errors import UserError


def check_same_shape(pred: torch.Tensor, reference: torch.Tensor, what: str, fix: str) -> None:
    """Raise a one-line UserError naming both shapes when they differ, e.g. what="predicted depth"."""
    if pred.shape != reference.shape:
        raise UserError(f"{what} {tuple(pred.shape)} and ground truth {tuple(reference.shape)} differ in shape: {fix}")
