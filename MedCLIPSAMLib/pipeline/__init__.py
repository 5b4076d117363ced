"""The zero-shot pipeline: text -> saliency -> coarse mask -> SAM2, for one image (image.py) or a volume (volume.py)."""
