"""Tumour segmentation: a coarse locator and a fine segmenter (MONAI 3D U-Nets).

The design follows ROI-Net (coarse-to-fine): the coarse network sees the
whole field of view at 5 mm isotropic and says where the tumour is; the fine
network sees a box 5 cm around it at in-plane resolution and draws the
boundary. The 5 cm box is deliberate: it is exactly how the real training
patients (``sts-t1-cropped``) were cut, so the fine model sees at inference
what it saw in training.

- :mod:`.card`: the model card (``card.yaml``) and the weights checksum check.
- :mod:`.network`: the two networks, built from the card's architecture block.
- :mod:`.data`: training cases from synthetic studies and NIfTI image/mask pairs.
- :mod:`.infer`: :class:`~.infer.Segmenter`, image in, mask out, on CUDA or CPU.
- :mod:`.train`: training both stages with checkpoint selection by validation Dice.
- :mod:`.metrics`: Dice, HD95 and bootstrap confidence intervals.
"""
