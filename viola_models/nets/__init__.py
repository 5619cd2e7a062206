"""The networks: viola-UNet and its attention (``viola_unet``, ``attention``), the nnU-Net-style
comparison net (MONAI ``DynUNet``), their named configurations (``configs``), and the converter and
importer of the authors' checkpoints (``reference``)."""
