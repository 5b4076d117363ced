"""SAM2 video propagation through a stack of slices held in memory.

SAM2's video predictor reads its frames only through `load_video_frames` (a JPEG folder or an mp4).
JPEG is lossy and 8-bit, and a folder of 1024x1024 frames for a whole CT would be written to disk and held
in memory as float32 (several GB). Instead, `init_state` is given a lazy frame sequence built from the
volume's own slices: each frame is made (padded, resized, normalised) only when SAM2 asks for it.
"""

from contextlib import contextmanager
from unittest import mock

import numpy as np

from .preprocess import pad_to_square, to_rgb, unpad

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SliceFrames:
    """A sequence of SAM2 input frames (3 x S x S float tensors) made on demand from volume slices."""

    def __init__(self, gray8_of, frames, image_size):
        self.gray8_of, self.frames, self.image_size = gray8_of, list(frames), image_size

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        square, _ = pad_to_square(self.gray8_of(self.frames[i]))
        # the same resize SAM2's own frame loader applies to its JPEGs (PIL, default filter), minus JPEG
        rgb = np.asarray(Image.fromarray(to_rgb(square)).resize((self.image_size, self.image_size)), np.float32) / 255.0
        x = torch.from_numpy(rgb).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std


@contextmanager
def _frames_source(frames, side):
    """Make SAM2's init_state take `frames` instead of reading a video path (and keep its own progress bar
    quiet: progress is reported by the caller)."""
    with mock.patch("sam2.sam2_video_predictor.load_video_frames", return_value=(frames, side, side)), \
            mock.patch("sam2.sam2_video_predictor.tqdm", side_effect=lambda iterable, **_: iterable):
        yield


def propagate_masks(predictor, volume_segmenter, frames, key_masks, threshold=0.5, patience=2, progress=None):
    """Yield (slice index, bool mask, probability) for slices in `frames` (consecutive indices), propagating
    the masks of the key slices {slice: mask (slice-sized)} forwards and backwards. A direction stops after
    `patience` empty frames beyond the last key slice."""
    import torch

    gray8_of = volume_segmenter.gray8
    first = gray8_of(frames[0])
    _, pad = pad_to_square(first)
    seq = SliceFrames(gray8_of, frames, predictor.image_size)
    position = {k: i for i, k in enumerate(frames)}
    with torch.inference_mode(), _frames_source(seq, pad.side):
        state = predictor.init_state(video_path="<in-memory slices>")
        for k, mask in key_masks.items():
            padded = np.zeros((pad.side, pad.side), bool)
            padded[pad.top:pad.top + pad.height, pad.left:pad.left + pad.width] = mask
            predictor.add_new_mask(state, frame_idx=position[k], obj_id=1, mask=padded)
        key_positions = sorted(position[k] for k in key_masks)
        seen = set()
        for reverse in (False, True):
            empty = 0
            for idx, _, logits in predictor.propagate_in_video(state, reverse=reverse):
                prob_full = torch.sigmoid(logits[0, 0].float()).cpu().numpy()
                prob = unpad(prob_full, pad)
                mask = prob > threshold
                beyond = idx > key_positions[-1] if not reverse else idx < key_positions[0]
                empty = empty + 1 if (not mask.any() and beyond) else 0
                if idx not in seen:
                    seen.add(idx)
                    if progress is not None:
                        progress.advance(1, f"slice {frames[idx]}")
                    yield frames[idx], mask, prob
                if empty >= patience:
                    break
        predictor.reset_state(state)
