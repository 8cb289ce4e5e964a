"""The recipe's losses (RECIPE.md "Losses"), one per file, plus their weighted sum."""

from versavit.losses.caption import answer_token_ce
from versavit.losses.depth import DepthLoss, gradient_matching_loss, normalize_ssi, ssi_loss
from versavit.losses.segmentation import SegmentationLoss, dice_loss
from versavit.losses.weighted import weighted_total

__all__ = [
    "DepthLoss",
    "SegmentationLoss",
    "answer_token_ce",
    "dice_loss",
    "gradient_matching_loss",
    "normalize_ssi",
    "ssi_loss",
    "weighted_total",
]
