"""Networks of the viola-UNet paper: viola-UNet, its attention, nnU-Net-r, and their configurations."""

from viola_models.attention import ViolaAttention
from viola_models.configs import build_model
from viola_models.reference import convert_reference_state_dict, from_reference_config, to_reference_state_dict
from viola_models.viola_unet import NNUNetR, ViolaUNet

__all__ = [
    "NNUNetR",
    "ViolaAttention",
    "ViolaUNet",
    "build_model",
    "convert_reference_state_dict",
    "from_reference_config",
    "to_reference_state_dict",
]
