"""nnU-Net v2's default trainer with the knobs train-weak needs (imported only when nnunetv2 is installed).

Everything nnU-Net does stays nnU-Net's: data loading, augmentation, loss, deep supervision, network. This
subclass changes only what its hard-coded constants fix: the epoch count and iterations per epoch (nnU-Net:
1000 x 250), the learning-rate schedule (a cosine per cycle, restarted at each snapshot, as the DynUNet
trainer's snapshot ensemble), optional mirroring (off by default: prompts can be lateral), and it saves a
weights-only snapshot at chosen epochs, reports each epoch and checks for a cancel after every iteration.
"""

import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .run_records import lr_factor


class _EpochLR:
    """nnU-Net steps its scheduler once per epoch; the per-iteration rate is set in train_step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def step(self, epoch=None):
        self.trainer._set_lr()


class nnUNetTrainer_MedCLIPSAM(nnUNetTrainer):
    def configure(self, epochs, iterations, snapshot_epochs, cycle_ends, mirror, save_snapshot, on_epoch,
                  check_cancelled):
        self.num_epochs = int(epochs)
        self.num_iterations_per_epoch = int(iterations)
        # nnU-Net validates 50 batches per 250 iterations: keep that ratio
        self.num_val_iterations_per_epoch = max(1, int(iterations) // 5)
        self.save_every = 10 ** 9        # no checkpoint_latest: the snapshots are the checkpoints
        self._snapshot_epochs = set(snapshot_epochs)
        self._cycle_ends = list(cycle_ends)
        self._mirror = bool(mirror)
        self._save_snapshot, self._on_epoch, self._check_cancelled = save_snapshot, on_epoch, check_cancelled
        self._iteration, self._epoch_start = 0, None

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not getattr(self, "_mirror", False):   # as nnU-Net's own nnUNetTrainerNoMirroring
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch, mirror_axes

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, _EpochLR(self)

    def _set_lr(self):
        factor = lr_factor(self._iteration, self.num_iterations_per_epoch, self._cycle_ends)
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * factor

    def on_epoch_start(self):
        self._epoch_start = time.perf_counter()
        super().on_epoch_start()

    def train_step(self, batch):
        self._set_lr()
        out = super().train_step(batch)
        self._iteration += 1
        self._check_cancelled()
        return out

    def validation_step(self, batch):
        out = super().validation_step(batch)
        self._check_cancelled()
        return out

    def network_state(self):
        mod = self.network.module if self.is_ddp else self.network
        mod = getattr(mod, "_orig_mod", mod)      # torch.compile wrapper
        return {k: v.detach().cpu().clone() for k, v in mod.state_dict().items()}

    def on_epoch_end(self):
        epoch = self.current_epoch + 1            # 1-based, as the DynUNet trainer's records
        super().on_epoch_end()
        def value(key):
            return float(self.logger.get_value(key, step=-1))

        # val_dice: nnU-Net's "pseudo Dice" on validation patches (against the held-out pseudo-labels)
        record = {"epoch": epoch, "loss": round(value("train_losses"), 6), "val_loss": round(value("val_losses"), 6),
                  "lr": self.optimizer.param_groups[0]["lr"], "val_dice": round(value("mean_fg_dice"), 6),
                  "seconds": round(time.perf_counter() - self._epoch_start, 3), "snapshot": None}
        if epoch in self._snapshot_epochs:
            record["snapshot"] = self._save_snapshot(self.network_state(), epoch, record["val_dice"])
        self._on_epoch(record)
