"""transformers' `Trainer` internals: checkpoints written under `.incomplete/` and renamed into place whole.

Trainer writes a checkpoint file by file; a run killed mid-save leaves a folder that looks resumable and is not.
This subclass redirects Trainer's private `_get_output_dir` while `_save_checkpoint` runs, then publishes.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_DIR = ".incomplete"  # where checkpoints are written before they are renamed into place


class StagedCheckpointTrainer(Trainer):
    """`Trainer` whose checkpoints appear whole or not at all."""
    _staging = False

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # what a killed run left
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its RNG state into `staged`
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        best = self.state.best_model_checkpoint
        moved = bool(best) and os.path.abspath(best).startswith(os.path.abspath(staging_root) + os.sep)
        if moved:  # Trainer looked for the best checkpoint in the staging folder; point it at the real one
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if self.args.should_save:
            if moved:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            _publish(staged, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)  # only when empty
        self.accelerator.wait_for_everyone()


def _publish(staged: str, final: str) -> None:
    """Rename a finished checkpoint folder into place (replacing one of the same step, if any).

    The files are flushed to disk first, so that after a crash of the machine, not only of the process,
    a renamed folder still holds whole files.
    """
    for entry in os.scandir(staged):
        if entry.is_file():
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
    old = None
    if os.path.exists(final):
        old = staged + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
