"""CrashSafeSaving: the save half of SFTTrainer, a mixin in front of `transformers.Trainer`.

Every file a save writes goes to a staging folder first and is moved into place with `os.replace`
(`tunesmith.checkpoint` has the pieces), so a killed run leaves each file old or new, never torn; a
full disk is said as such, with the space needed. A checkpoint folder gets its manifest and the
resolved config, and older checkpoints rotate away only after the new one is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import Trainer

__all__ = ["CrashSafeSaving"]


class CrashSafeSaving(Trainer):
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Write the adapter (LoRA) or the full model, the tokenizer with its chat template, and the
        resolved config (`tunesmith_config.yaml`) to `output_dir` (default `args.output_dir`).
        Trainer calls this for every checkpoint too, so each checkpoint folder holds its config.

        Crash-safe: written into a staging folder first, then each file moved into place with
        `os.replace`, so a kill leaves every file old or new, never torn. (A checkpoint's call is
        already inside `_save_checkpoint`'s staging folder.)"""
        if _internal_call:
            super().save_model(output_dir, _internal_call)
            if self.args.should_save:
                self.args.save_resolved(output_dir or self.args.output_dir)
            return
        from tunesmith import checkpoint as ckpt

        target = output_dir or self.args.output_dir
        staged = Path(target) / ckpt.STAGING / "model"
        if self.args.should_save:
            ckpt.staging_dir(target, "model")
        self.accelerator.wait_for_everyone()
        try:
            super().save_model(str(staged), _internal_call=True)  # no Hub push from the staging folder
            if self.args.should_save:
                self.args.save_resolved(staged)
                ckpt.publish_files(staged, target)
        except Exception as err:
            if ckpt.is_disk_full(err, target, _model_bytes(self.model)):
                shutil.rmtree(staged, ignore_errors=True)
                raise ckpt.space_error(target, "the final model", _model_bytes(self.model), err) from None
            raise
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint of a model with tied weights (SmolLM2's lm_head is its embedding matrix) stores the
        # matrix once; the tied name is "missing" but loaded through its twin: not worth a warning
        first: dict[int, str] = {}
        tied = set()
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                tied.add(name)
        if tied and hasattr(load_result, "_replace"):  # torch's _IncompatibleKeys, a named tuple
            load_result = load_result._replace(
                missing_keys=[k for k in load_result.missing_keys if k not in tied]
            )
        super()._issue_warnings_after_load(load_result)

    def _get_output_dir(self, trial) -> str:
        # while a checkpoint is written, Trainer's own save goes into the staging folder
        staging = getattr(self, "_staging_root", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint (weights, optimizer, scheduler, RNG states, trainer state, tokenizer,
        config), written into `output_dir/.tunesmith-staging/checkpoint-N`, flushed, given its manifest,
        then renamed to `output_dir/checkpoint-N`; older checkpoints rotate away only after that."""
        from transformers.trainer_utils import rotate_checkpoints

        from tunesmith import checkpoint as ckpt

        run_dir = super()._get_output_dir(trial)
        step = self.state.global_step
        name = f"checkpoint-{step}"
        root = Path(run_dir) / ckpt.STAGING
        last = ckpt.newest_complete(run_dir)
        needed = ckpt.folder_size(last) if last else None  # the next checkpoint needs about as much
        intact = (
            f"the last complete checkpoint, {last.name}, is intact" if last else "no checkpoint was saved yet"
        )
        if self.args.should_save:
            if root.exists():
                shutil.rmtree(root)  # what a killed save left behind
            free = shutil.disk_usage(run_dir).free
            if needed and free < needed:
                _remove_empty(root.parent)
                raise ckpt.space_error(run_dir, name, needed, intact=intact)
            root.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = root
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            needed = needed or _model_bytes(self.model)
            if ckpt.is_disk_full(err, run_dir, needed):
                shutil.rmtree(root, ignore_errors=True)
                raise ckpt.space_error(run_dir, name, needed, err, intact=intact) from None
            raise
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = root / name, Path(run_dir) / name
            best = self.state.best_global_step
            if best:  # Trainer looked for the best checkpoint in the staging folder: point it at the real one
                best_dir = Path(run_dir) / f"checkpoint-{best}"
                if best == step or best_dir.exists():
                    self.state.best_model_checkpoint = str(best_dir)
                    self.state.save_to_json(str(staged / "trainer_state.json"))
            ckpt.fsync_tree(staged)
            ckpt.write_manifest(staged, step)
            ckpt.publish_checkpoint(staged, final)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _model_bytes(model) -> int:
    """A lower bound of what a save writes: the trainable weights (+ AdamW's two fp32 moments each),
    or every weight for a full fine-tune."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if trainable == sum(p.numel() for p in params):
        weights = sum(p.numel() * p.element_size() for p in params)
    else:
        weights = trainable * 4
    return weights + trainable * 8
