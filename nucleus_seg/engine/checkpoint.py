"""Checkpoints that cost what they must: written atomically, the last few kept, no duplicate of the final one.

detectron2 keeps every periodic checkpoint (~500 MB each for R101-FPN with its optimizer state), writes the
one at the last iteration twice (``model_0000399.pth`` and ``model_final.pth``, byte for byte), and writes
straight into the target file, so a crash leaves half a checkpoint that ``--resume`` then loads.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks

from ..utils.files import atomic_path, atomic_write

__all__ = ["NucleusCheckpointer", "PeriodicCheckpointer", "previous_run_files"]

logger = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^model_\d{7}\.pth$")
#: What a training run leaves in OUTPUT_DIR that a new run would overwrite or mix into its own.
RUN_FILES = ("last_checkpoint", "metrics.json", "final_metrics.json")


def previous_run_files(output_dir: str | Path) -> list[Path]:
    """A training run's checkpoints, metrics and curves in ``output_dir`` (empty for a fresh folder)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    found += sorted(folder.glob("model_*.pth")) + sorted(folder.glob("events.out.tfevents.*"))
    found += sorted(folder.glob("training_*.png"))
    return found


class NucleusCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, writing through a temp file (and the ``last_checkpoint`` tag too)."""

    def save(self, name: str, weights_only: bool = False, **kwargs) -> None:
        """Save ``model`` and every checkpointable (optimizer, scheduler, trainer) as ``name.pth``; with
        ``weights_only`` the model and ``kwargs`` alone (what inference needs, a third of the size)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        if not weights_only:
            data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        path = Path(self.save_dir) / f"{name}.pth"
        self.logger.info("Saving checkpoint to %s%s", path, " (weights only)" if weights_only else "")
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(Path(self.save_dir) / "last_checkpoint", last_filename_basename)


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """A checkpoint every ``period`` iterations, the last ``keep`` of them kept, and at the end only
    ``model_final.pth`` (with ``final_only``: weights alone, and no periodic checkpoint left beside it)."""

    def __init__(self, checkpointer: NucleusCheckpointer, period: int, keep: int = 2, final_only: bool = False,
                 max_iter: int | None = None):
        super().__init__(checkpointer, period, max_iter=max_iter, max_to_keep=keep if keep > 0 else None)
        self.final_only = final_only

    def step(self, iteration: int, **kwargs) -> None:
        if self.max_iter is not None and int(iteration) >= self.max_iter - 1:
            self.save_final(int(iteration), **kwargs)  # not also as a periodic checkpoint of the same weights
        else:
            super().step(iteration, **kwargs)

    def save_final(self, iteration: int, **kwargs) -> None:
        self.checkpointer.save(f"{self.file_prefix}_final", weights_only=self.final_only, iteration=iteration,
                               **kwargs)
        if self.final_only:
            for path in Path(self.checkpointer.save_dir).iterdir():
                if _PERIODIC.match(path.name):
                    path.unlink()
