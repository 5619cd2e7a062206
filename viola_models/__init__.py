"""viola-UNet and its comparison net, trained, run and scored; knows nothing of the pipeline.

Rooms: ``nets`` (the networks, their configurations, the authors' checkpoints), ``training`` (one
network's training: settings, batches and augmentations, losses, the loop), ``inference`` (sliding
window, CPU and GPU backends, member checkpoints, ensembles, confidence scores, segmenting scans,
pseudo-labels) and ``evaluation`` (INSTANCE 2022 metrics, test scoring and bootstrap intervals).
The networks' public names are importable from here.
"""

from viola_models.nets.attention import ViolaAttention
from viola_models.nets.configs import build_model
from viola_models.nets.reference import convert_reference_state_dict, from_reference_config, to_reference_state_dict
from viola_models.nets.viola_unet import NNUNetR, ViolaUNet

__all__ = [
    "NNUNetR",
    "ViolaAttention",
    "ViolaUNet",
    "build_model",
    "convert_reference_state_dict",
    "from_reference_config",
    "to_reference_state_dict",
]
