"""MedCLIPSAMLib: text-prompted medical image segmentation (MedCLIP-SAM family), Qt-free.

Nothing heavy is imported here: torch, open_clip and sam2 load lazily inside the functions that need them.
"""

__version__ = "0.1.0"
