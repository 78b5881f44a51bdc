"""SFTTrainer: a thin `transformers.Trainer` for supervised fine-tuning, drop-in for TRL 1.x's.

What it adds to Trainer, and where:

- `__init__` wires the pieces: model (`models.load`), LoRA (`models.adapters`), fast modules
  (`ops.apply.optimize`), memory policy, data (`data.pipeline.prepare_dataset`) and collator
  (`data.collate`). Old TRL spellings (`tokenizer=`, `max_seq_length=`, ...) still work, once noticed.
- `compute_loss` reads top to bottom: the model to its final hidden states (no logits), the fused
  `linear_cross_entropy` against `shift_labels`, divided by the supervised tokens of the whole
  optimizer step, then metrics.
- `prediction_step` / `evaluation_loop`: eval loss weighted by tokens (independent of batch size).
- `create_optimizer`: parameter groups (embedding learning rate, no decay on norms and biases).
- `log`: token accuracy, entropy (computed inside the fused loss), tokens seen, tokens per second,
  supervised tokens.

Under FSDP or DeepSpeed the LM head's weight is sharded outside the forward, so there the loss is
computed from the logits the model returns (`logits_loss_sum`): the same value, without the fused
loss's memory saving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from tunesmith.callbacks import (
    NonFiniteLossGuard,
    ReleaseHostMemoryCallback,
    SampleGenerationCallback,
    SignalCheckpointCallback,
)
from tunesmith.common import IGNORE_INDEX
from tunesmith.config import SFTConfig, deprecation_notice, notice_once
from tunesmith.data.settings import DataSettings

__all__ = ["SFTTrainer", "UnslothTrainer", "final_hidden_states", "lm_head_parameters", "logits_loss_sum"]

logger = logging.getLogger(__name__)


# Old keyword arguments of SFTTrainer (TRL < 0.20, Unsloth notebooks) -> SFTConfig field.
_OLD_TRAINER_KWARGS = {
    "dataset_text_field": "dataset_text_field",
    "max_seq_length": "max_length",
    "packing": "packing",
    "dataset_num_proc": "dataset_num_proc",
    "dataset_kwargs": "dataset_kwargs",
}

# Batch keys the model's forward takes; the rest (labels, shift_labels, ...) are for the loss.
_FORWARD_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    # vision-language batches (data.vision.VisionCollator): whatever the family's processor gives the model
    "pixel_values",
    "pixel_attention_mask",
    "image_grid_thw",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
)

# Padding-free batches on the CPU are padded to a multiple of this many tokens (see
# PaddingFreeCollator): a bounded set of shapes for oneDNN's per-shape kernel caches.
CPU_PAD_TO_MULTIPLE_OF = 64

# Columns of a prepared dataset that the collators read (Trainer drops any other column).
_DATASET_COLUMNS = ["input_ids", "labels", "seq_lengths", "example_index", "attention_mask", "position_ids"]
# ... and the rows of a prepared vision dataset (data.vision.VisionDataset)
_VISION_ROW_COLUMNS = ["text", "text_ids", "trained", "images", "image_sizes", "length", "image_tokens"]


class SFTTrainer(Trainer):
    """Supervised fine-tuning trainer with TRL 1.x's constructor.

    Args (as TRL's): model (name/path, PreTrainedModel or PeftModel; None: `args.model_name_or_path`
    or the built-in default), args (SFTConfig, or TrainingArguments which is converted), data_collator,
    train_dataset, eval_dataset (one or a dict of them), processing_class (the tokenizer),
    compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics,
    peft_config, formatting_func. Old spellings: tokenizer=, dataset_text_field=, max_seq_length=,
    packing=, dataset_num_proc=, dataset_kwargs=.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | torch.nn.Module | None = None,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        peft_config=None,
        formatting_func=None,
        **old_kwargs,
    ):
        args = _as_sft_config(args, model)
        max_length_given = "max_seq_length" in old_kwargs
        processing_class = _apply_old_kwargs(args, processing_class, old_kwargs)
        _check_before_work(args, train_dataset, formatting_func)
        model_max_length = getattr(model, "max_seq_length", None)  # set by FastLanguageModel
        if model_max_length and args.max_length == SFTConfig.max_length and not max_length_given:
            logger.info("using the model's max_seq_length=%d as max_length", model_max_length)
            args.max_length = int(model_max_length)
        _fall_back_from_bitsandbytes(args)

        # Seed before anything random is made (LoRA's initialisation, a model loaded by name), not only in
        # Trainer.__init__ below, which runs after: two runs of one config then agree from step 1.
        _seed_everything(args)
        model, self.memory_policy = _prepare_model(model, args, peft_config)
        processing_class = _prepare_tokenizer(processing_class, model, args)
        skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset"))
        # what prepare_dataset did to each split (examples in/out, truncated, dropped, how files were read)
        self.data_stats: dict = {}
        # TRL's vision recipe: a processor and the user's own collator, which reads the raw rows
        raw_vision = data_collator is not None and _is_processor(processing_class)
        skip_prepare = skip_prepare or raw_vision
        if not skip_prepare:
            train_dataset, eval_dataset = _prepare_datasets(
                train_dataset, eval_dataset, processing_class, args, formatting_func, stats=self.data_stats
            )
        self.mixture_stats = getattr(
            train_dataset, "mixture_stats", None
        )  # several sources: per-source lines
        # evaluate(eval_dataset=raw) prepares it as the constructor's eval_dataset
        self._formatting_func, self._skip_prepare = formatting_func, skip_prepare
        if data_collator is None:
            data_collator = _default_collator(model, processing_class, args)
        _no_batch_dispatch_for_streams(args, train_dataset, eval_dataset)
        data_collator = _WithExampleIndex(data_collator)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # Trainer counts `num_items_in_batch` (supervised tokens over every micro-batch of the optimizer
        # step, gathered over processes, from `shift_labels`) only for models that "accept loss kwargs";
        # our compute_loss divides by it, so the loss is already scaled for gradient accumulation.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        if not skip_prepare:
            self._signature_columns = list(_DATASET_COLUMNS) + list(_VISION_ROW_COLUMNS)
        elif raw_vision:  # the user's collator gets every column (messages, images, ...)
            self._signature_columns = (
                list(getattr(train_dataset, "column_names", None) or []) + _DATASET_COLUMNS
            )
        self.nonfinite_guard = NonFiniteLossGuard()
        self._step_rows: list[int] = []
        self._signal_stop = SignalCheckpointCallback()
        self.add_callback(self._signal_stop)
        if self.args.device.type == "cpu":
            self.add_callback(ReleaseHostMemoryCallback())
        if args.sample_prompts:
            self.add_callback(
                SampleGenerationCallback(
                    args.sample_prompts,
                    args.sample_max_new_tokens,
                    chat_template_kwargs=args.chat_template_kwargs,
                )
            )
        self._window = _TokenCounters(self.args.device)
        self._window_start = time.perf_counter()
        self._eval_totals: torch.Tensor | None = None
        self.generation_eval = _generation_evaluator(self, args, skip_prepare)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train; `resume_from_checkpoint=True` takes the newest *complete* checkpoint in
        `output_dir` (saying which, and why newer ones were skipped), a path is checked to be complete
        first (see `tunesmith.checkpoint`)."""
        from tunesmith.checkpoint import resolve_resume

        resume_from_checkpoint = resolve_resume(self.args.output_dir, resume_from_checkpoint)
        # tokens/s counts from the first step, not from the trainer's construction
        self._window.reset()
        self._window_start = time.perf_counter()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.stopped_by:
            logger.warning(
                "stopped at step %d of %d (%s); the checkpoint is in %s; resume with resume_from_checkpoint=True",
                self.state.global_step,
                self.state.max_steps,
                self.stopped_by,
                os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}"),
            )
        if self.memory_policy is not None and self.memory_policy.policy == "auto":
            logger.info(self.memory_policy.summary())
        return output

    @property
    def stopped_by(self) -> str | None:
        """ "SIGTERM" / "SIGINT" when the last `train()` stopped early on that signal (after saving a
        checkpoint), else None (also when the signal came during the last step: the run is complete)."""
        if self.state.max_steps and self.state.global_step >= self.state.max_steps:
            return None
        return self._signal_stop.signal_name

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        example_index = inputs.pop("example_index", None)
        _ensure_shift_labels(inputs)
        if model.training and self.memory_policy is not None:
            # memory_policy=auto: checkpoint just enough layers for this micro-batch's size
            self.memory_policy.plan(inputs["input_ids"].numel())
        shift_labels = inputs["shift_labels"]  # (B, T): next token where trained, else -100
        loss_sum, num_correct, entropy_sum = self._loss_sum(model, inputs)
        num_supervised = (shift_labels != IGNORE_INDEX).sum()
        self.nonfinite_guard.check(loss_sum, self.state.global_step, example_index)
        if model.training and example_index is not None:
            self._step_rows.extend(example_index)  # named if this optimizer step's gradient is non-finite

        # Divide by the supervised tokens of the whole optimizer step (all micro-batches, all
        # processes) so that accumulation and data parallelism do not change the result.
        denominator = num_supervised if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(denominator, device=loss_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes

        if model.training:
            self._window.add(loss_sum, num_correct, num_supervised, _real_tokens(inputs), entropy_sum)
        return (loss, None) if return_outputs else loss

    def _loss_sum(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sums over the supervised tokens of this micro-batch: token losses (fp32), argmax hits, and
        entropies of the predicted distribution (fp32, detached; logged as `entropy`)."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # FSDP / ZeRO-3 gather the LM head's weight only inside the model's forward, so the fused
            # loss cannot read it from outside: let the model build the logits (more memory, same loss)
            return logits_loss_sum(model, inputs, dft=self.args.loss_type == "dft")
        hidden = final_hidden_states(model, inputs)  # (B, T, H)
        weight, bias = lm_head_parameters(model)  # (V, H), (V,) or None
        from tunesmith.ops.linear_cross_entropy import linear_cross_entropy

        out = linear_cross_entropy(
            hidden,
            weight,
            inputs["shift_labels"],
            bias=bias,
            softcap=_final_logit_softcap(model),
            dft=self.args.loss_type == "dft",
            reduction="sum",
            impl=_loss_impl(self.args),
            return_entropy=self.args.log_entropy,
        )
        return out if self.args.log_entropy else (*out, torch.zeros((), device=hidden.device))

    # ------------------------------------------------------------------ evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        inputs.pop("example_index", None)
        _ensure_shift_labels(inputs)
        with torch.no_grad():
            loss_sum, num_correct, entropy_sum = self._loss_sum(model, inputs)
        num_supervised = (inputs["shift_labels"] != IGNORE_INDEX).sum()
        if self._eval_totals is not None:
            self._eval_totals += torch.stack(
                [loss_sum.double(), num_correct.double(), num_supervised.double(), entropy_sum.double()]
            )
        loss = (loss_sum / num_supervised.clamp(min=1)).detach()
        if prediction_loss_only:
            return loss, None, None
        # compute_metrics wants logits: only then are the full (B, T, V) logits built
        with torch.no_grad():
            forward = {k: inputs[k] for k in _FORWARD_KEYS if k in inputs}
            logits = model(**forward, use_cache=False).logits
        return loss, logits, inputs["labels"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Trainer.evaluate, with a raw `eval_dataset` (or a dict of them) prepared exactly as the
        constructor prepares its `eval_dataset`: format, template, masks, `eval_packing`, cache. A dataset
        this trainer already prepared, or a name of one of its eval sets, is used as it is."""
        if eval_dataset is not None and not isinstance(eval_dataset, str) and not self._skip_prepare:
            eval_dataset = _prepare_eval(
                eval_dataset, self.processing_class, self.args, self._formatting_func
            )
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # loss sum, correct tokens, supervised tokens, entropy sum, summed over every eval batch
        self._eval_totals = torch.zeros(4, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            loss_sum, correct, supervised, entropy = self.accelerator.reduce(
                self._eval_totals, reduction="sum"
            ).tolist()
        finally:
            self._eval_totals = None
        if supervised > 0:
            # Trainer's eval loss is a mean of per-batch means, which depends on the batch size;
            # this is the mean over tokens.
            eval_loss = loss_sum / supervised
            output.metrics[f"{metric_key_prefix}_loss"] = eval_loss
            output.metrics[f"{metric_key_prefix}_mean_token_accuracy"] = correct / supervised
            if self.args.log_entropy:
                output.metrics[f"{metric_key_prefix}_entropy"] = entropy / supervised
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(eval_loss, 700.0))
            output.metrics[f"{metric_key_prefix}_num_supervised_tokens"] = int(supervised)
        if (
            getattr(self, "generation_eval", None) is not None
        ):  # eval_generation: exact match and chrF of greedy answers
            output.metrics.update(
                self.generation_eval.run(
                    self.model,
                    self.processing_class,
                    metric_key_prefix,
                    self.state.global_step,
                    output_dir=self.args.output_dir if self.is_world_process_zero() else None,
                )
            )
        return output

    # ------------------------------------------------------------------ optimizer, logging, saving

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            return super().create_optimizer(model)  # GaLore / LOMO / layer-wise: they build their own groups
        from tunesmith.models.adapters import parameter_groups

        groups = parameter_groups(
            opt_model,
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            embedding_learning_rate=self.args.embedding_learning_rate,
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every process gets here together, so we can reduce
            loss_sum, correct, supervised, tokens, entropy = self.accelerator.reduce(
                self._window.totals(), "sum"
            ).tolist()
            now = time.perf_counter()
            # running totals continue from the last log (also the one restored from a checkpoint)
            last = next((e for e in reversed(self.state.log_history) if "num_tokens" in e), {})
            logs["mean_token_accuracy"] = correct / supervised if supervised else 0.0
            if self.args.log_entropy:  # mean entropy of the predicted next-token distribution (as TRL)
                logs["entropy"] = entropy / supervised if supervised else 0.0
            logs["num_tokens"] = last.get("num_tokens", 0) + int(tokens)
            logs["num_supervised_tokens"] = last.get("num_supervised_tokens", 0) + int(supervised)
            logs["tokens_per_second"] = round(tokens / max(now - self._window_start, 1e-9), 2)
            self._window.reset()
            self._window_start = now
        super().log(logs, start_time)

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

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer calls this once per optimizer step, after clipping and before `optimizer.step()`: a NaN /
        # inf norm stops there, so its update is never applied, naming the rows of that step's batches
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        rows, self._step_rows = self._step_rows, []
        if grad_norm is not None:
            self.nonfinite_guard.check_grad_norm(
                grad_norm,
                self.state.global_step,
                rows,
                learning_rate=self._get_learning_rate(),
                max_grad_norm=self.args.max_grad_norm,
            )
        return grad_norm

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


UnslothTrainer = SFTTrainer


def _seed_everything(args: SFTConfig) -> None:
    from transformers.trainer_utils import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


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


# ---------------------------------------------------------------------- model helpers


def final_hidden_states(model, inputs: dict) -> torch.Tensor:
    """(B, T, H) hidden states after the final norm, without computing logits.

    The forward goes through the (possibly DDP / PEFT) wrapper so that gradient synchronisation and
    adapters work as usual; `logits_to_keep` = no position makes the LM head project nothing. The
    hidden states are taken from the decoder's own output by a hook for the length of the call, not
    from `output_hidden_states=True`: that returns every layer's output, which stays alive with the
    outputs (defeating activation checkpointing), and under bf16 mixed precision accelerate copies
    each of them to fp32 (measured on SmolLM2 on the CPU: the loss then ran its matmuls in fp32).
    """
    forward = {k: inputs[k] for k in _FORWARD_KEYS if k in inputs}
    no_position = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
    decoder = _decoder(model)
    if decoder is None:
        outputs = model(
            **forward,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=no_position,
            return_dict=True,
        )
        return outputs.hidden_states[-1]  # transformers ties it to last_hidden_state (after the final norm)
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**forward, use_cache=False, logits_to_keep=no_position, return_dict=True)
    finally:
        handle.remove()
    return captured[-1]


def _decoder(model) -> torch.nn.Module | None:
    """The base model's decoder stack (whose output is the final-norm hidden states), if it has one."""
    base = _unwrap(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not base else None


def logits_loss_sum(
    model, inputs: dict, dft: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain path: full (B, T, V) logits from the model's forward (its soft-capping included),
    then the summed cross-entropy against `shift_labels`, the argmax hits and the summed entropy of
    the softmax at the supervised positions (detached)."""
    forward = {k: inputs[k] for k in _FORWARD_KEYS if k in inputs}
    logits = model(**forward, use_cache=False, return_dict=True).logits.float()  # (B, T, V)
    targets = inputs["shift_labels"]  # (B, T)
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    if dft:  # each token's loss weighted by the probability of its target, without gradient through it
        per_token = per_token * torch.exp(-per_token).detach()
    supervised = targets != IGNORE_INDEX
    num_correct = ((logits.argmax(-1) == targets) & supervised).sum().detach()
    with torch.no_grad():
        log_p = torch.log_softmax(logits[supervised], dim=-1)  # (n, V)
        entropy_sum = -(log_p.exp() * log_p).sum()
    return per_token.sum(), num_correct, entropy_sum


def _unwrap(model) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DataParallel
        model = model.module
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model


def lm_head_parameters(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's effective (weight (V, H), bias (V,) or None), through PEFT's wrappers.

    - `modules_to_save=["lm_head"]`: the trained copy of the active adapter;
    - LoRA on the head: base weight + the adapter's delta (dropout on the head's input is not applied);
    - tied embeddings: the head's weight is the embedding matrix, which is what we return.
    """
    head = _unwrap(model).get_output_embeddings()
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = head.active_adapters[0] if head.active_adapters else None
        head = (
            head.original_module
            if head.disable_adapters or active not in head.modules_to_save
            else head.modules_to_save[active]
        )
    if hasattr(head, "base_layer") and hasattr(head, "get_delta_weight"):
        weight = head.base_layer.weight
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name in head.lora_A:
                    weight = weight + head.get_delta_weight(name)
        return weight, head.base_layer.bias
    return head.weight, getattr(head, "bias", None)


def _final_logit_softcap(model) -> float | None:
    config = _unwrap(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None) or None


def _ensure_shift_labels(inputs: dict) -> None:
    """A user's own collator may give only `labels` (B, T): shift them once here, one document per row."""
    if "shift_labels" in inputs:
        return
    if "labels" not in inputs:
        raise ValueError(
            "SFTTrainer: the batch has neither shift_labels nor labels; a custom data_collator must return "
            "labels (B, T) with -100 on the tokens not trained (tunesmith.data.collate gives both)"
        )
    from tunesmith.data.collate import shift_labels

    labels = inputs["labels"]
    inputs["shift_labels"] = shift_labels(labels, [[labels.shape[1]]] * labels.shape[0])


def _real_tokens(inputs: dict) -> torch.Tensor:
    """Non-padding tokens in the batch (a padding-free batch's padding is its last `padding_tokens`)."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    real = inputs["input_ids"].numel() - int(inputs.get("padding_tokens", 0))
    return torch.tensor(real, device=inputs["input_ids"].device)


class _TokenCounters:
    """Local sums since the last log: loss, correct, supervised tokens, real tokens, entropy (one
    tensor, one reduce)."""

    def __init__(self, device):
        self._sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, loss_sum, correct, supervised, tokens, entropy):
        values = [loss_sum.detach(), correct, supervised, tokens, entropy]
        self._sums += torch.stack([torch.as_tensor(v, device=self._sums.device).double() for v in values])

    def totals(self) -> torch.Tensor:
        return self._sums.clone()

    def reset(self):
        self._sums.zero_()


# ---------------------------------------------------------------------- construction helpers


def _as_sft_config(args, model) -> SFTConfig:
    if isinstance(args, SFTConfig):
        return args
    if args is None:
        name = (
            str(model)
            if isinstance(model, (str, os.PathLike))
            else _model_name(model)
            if model is not None
            else "tunesmith"
        )
        return SFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-SFT")
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"SFTTrainer: args must be an SFTConfig or a TrainingArguments, got {type(args).__name__}"
        )
    # A plain TrainingArguments keeps its own values (lr 5e-5, no bf16, ...) and gets SFTConfig's data defaults.
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    if values.get("fp16") and not torch.cuda.is_available():
        logger.warning(
            "fp16=True needs a GPU; this machine has none, so training runs in the model's own dtype"
        )
        values["fp16"] = False
    return SFTConfig(**values)


def _apply_old_kwargs(args: SFTConfig, processing_class, old_kwargs: dict):
    """Move TRL's old trainer keyword arguments onto `args` (each noticed once); return the tokenizer."""
    if "tokenizer" in old_kwargs:
        deprecation_notice(
            "SFTTrainer.tokenizer",
            "SFTTrainer(tokenizer=...) is the old spelling of processing_class=...; rename it.",
        )
        tokenizer = old_kwargs.pop("tokenizer")
        processing_class = processing_class if processing_class is not None else tokenizer
    for old, new in _OLD_TRAINER_KWARGS.items():
        if old in old_kwargs:
            value = old_kwargs.pop(old)
            deprecation_notice(
                f"SFTTrainer.{old}",
                f"SFTTrainer({old}=...) is deprecated: set it on the config, SFTConfig({new}=...). Using {new}={value!r}.",
            )
            setattr(args, new, value)
    if old_kwargs:
        raise TypeError(
            f"SFTTrainer got unexpected keyword argument(s) {sorted(old_kwargs)}; "
            "SFTConfig fields go in args=SFTConfig(...)"
        )
    return processing_class


def _loss_impl(args: SFTConfig) -> str:
    """The fused loss's impl: the full-logits reference without kernels, the chunked PyTorch path with
    triton_kernels=False, else "auto" (its Triton kernel on CUDA once checked, ops.selfcheck)."""
    if not args.use_kernels:
        return "reference"
    return "auto" if args.triton_kernels else "chunked"


def _fall_back_from_bitsandbytes(args: SFTConfig) -> None:
    name = OptimizerNames(args.optim).value
    needs_bnb = "8bit" in name or "bnb" in name or name.startswith("paged_")
    if not needs_bnb:
        return
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return
    logger.warning(
        "optim=%r needs bitsandbytes on a CUDA GPU, which this machine lacks; using adamw_torch instead "
        "(same update, 32-bit optimizer state)",
        name,
    )
    args.optim = OptimizerNames.ADAMW_TORCH


def _model_name(model) -> str:
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "_name_or_path", None) or "model"


def _prepare_model(model, args: SFTConfig, peft_config):
    """Load (if given by name), add LoRA, swap in fast modules and set the memory policy."""
    full_ft = peft_config is None and not args.use_peft
    if model is None or isinstance(model, (str, os.PathLike)):
        from tunesmith.models.load import default_model_path, load_model

        name = str(model or args.model_name_or_path or default_model_path())
        kwargs = _load_kwargs(args)
        if full_ft:
            _fp32_master_weights(args, kwargs)
        model = load_model(name, **kwargs)
    elif args.attention not in ("auto", "tunesmith_varlen"):
        _unwrap(model).set_attn_implementation(args.attention)

    is_peft = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    if peft_config is not None or (args.use_peft and not is_peft):
        from tunesmith.models.adapters import apply_lora

        if peft_config is not None:
            model = apply_lora(
                model,
                peft_config,
                vision_tower=args.lora_vision_tower,
                train_projector=args.lora_train_projector,
            )
        else:
            model = apply_lora(
                model,
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules or "all-linear",
                modules_to_save=args.lora_modules_to_save,
                vision_tower=args.lora_vision_tower,
                train_projector=args.lora_train_projector,
            )
    if full_ft:
        _warn_if_16bit_full_finetune(model, args)
    if args.use_kernels:
        from tunesmith.ops.apply import optimize

        optimize(model, impl="auto" if args.triton_kernels else "torch")
    handle = None
    if not args.gradient_checkpointing:
        policy = "offload" if args.activation_offloading else args.memory_policy
        if policy != "none":
            from tunesmith.ops.offload import apply_memory_policy

            # upper bound of the tokens in one micro-batch, for the "auto" memory estimate
            batch_tokens = args.per_device_train_batch_size * (args.max_length or 2048)
            budget = args.activation_memory_budget_gb
            handle = apply_memory_policy(
                model,
                policy,
                batch_tokens=batch_tokens,
                device=args.device,
                activation_budget=None if budget is None else int(budget * 2**30),
            )
    return model, handle


def _load_kwargs(args: SFTConfig) -> dict[str, Any]:
    """`load_model` keyword arguments: tunesmith's choices from the config, then TRL's
    `model_init_kwargs`, which win (`dtype` / `torch_dtype`, `attn_implementation`, `device_map`,
    `revision`, `trust_remote_code`, `quantization_config`, ... all go to `from_pretrained`)."""
    attn = None if args.attention in ("auto", "tunesmith_varlen") else args.attention
    kwargs: dict[str, Any] = {
        "dtype": args.model_dtype,
        "trust_remote_code": args.trust_remote_code,
        "attn_implementation": attn,
        "quantization": args.model_quantization,
        "gguf_file": args.model_gguf_file,
    }
    init = dict(args.model_init_kwargs or {})
    if "dtype" in init or "torch_dtype" in init:
        # The user's dtype (either spelling) replaces `model_dtype`. It goes to load_model as
        # `torch_dtype`, a from_pretrained argument (its own `dtype` parameter is tunesmith's: there
        # "auto" is the hardware's choice, while here "auto" means the checkpoint's dtype, as in TRL).
        kwargs.pop("dtype")
        init["torch_dtype"] = init.pop("dtype") if "dtype" in init else init["torch_dtype"]
    if init.get("attn_implementation") is not None and args.attention == "auto":
        # their attention also decides what padding-free batches use (see _default_collator)
        args.attention = init["attn_implementation"]
    kwargs.update(init)
    return kwargs


def _fp32_master_weights(args: SFTConfig, load_kwargs: dict[str, Any]) -> None:
    """Full fine-tuning keeps its updates: where `model_dtype="auto"` means bf16, load fp32 weights and
    compute in bf16 through autocast instead (args.bf16 on).

    Why: AdamW on bf16 weights rounds every update to the weight's 8-bit mantissa, so an update
    smaller than about 1/256 of the weight is lost. At fine-tuning learning rates (1e-5) most are: on a
    tiny Llama, 20 steps moved the weights 0.52x as far as fp32 weights did, in a direction with cosine
    0.35 to theirs (bench/RESULTS.md, "Full fine-tuning keeps its updates"). LoRA is unaffected (its
    adapters are fp32 and its base frozen). The cost: fp32 weights and gradients (2x the weight memory
    of bf16) and AdamW state in fp32. `fp32_master_weights=False` or an explicit dtype keeps bf16."""
    from tunesmith.models.load import resolve_dtype

    if (
        not args.fp32_master_weights
        or args.model_quantization is not None
        or args.model_dtype != "auto"
        or "torch_dtype" in load_kwargs  # model_init_kwargs chose the dtype
    ):
        return
    if resolve_dtype("auto", args.device) != torch.bfloat16:
        return  # fp32 already (or fp16 on pre-Ampere GPUs, where autocast would need a loss scaler)
    load_kwargs["dtype"] = torch.float32
    if not args.bf16:
        args.bf16 = True  # accelerate then runs the forward under bf16 autocast, on the CPU too
        args.mixed_precision = "bf16"
    logger.info(
        "full fine-tuning: fp32 master weights, bf16 compute (autocast); fp32_master_weights=False "
        "loads bf16 weights instead (half the weight memory, small updates rounded away)"
    )


def _warn_if_16bit_full_finetune(model, args: SFTConfig) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    low = [p for p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    if low and len(low) * 2 > len(trainable):
        dtype = str(low[0].dtype).removeprefix("torch.")
        notice_once(
            "full_finetune_16bit",
            f"full fine-tuning with {dtype} weights: AdamW's updates smaller than about 1/256 of a weight "
            f"are rounded away (at learning_rate={args.learning_rate:g} most are). Load the model in fp32 "
            "(dtype=torch.float32; the trainer's own loader does that by default, with bf16 compute) or "
            "train LoRA.",
        )


def _check_before_work(args: SFTConfig, train_dataset, formatting_func) -> None:
    """The settings TRL refuses when the trainer is built, refused here too, before anything loads."""
    if train_dataset is None and not args.datasets:
        raise ValueError(
            "SFTTrainer: `train_dataset` is required (got None). Pass train_dataset=... (a datasets.Dataset, a "
            "list of dicts, a file or folder path, or a Hub dataset name); to only evaluate, pass the eval data "
            "as train_dataset too, or use `tunesmith train` with a `dataset:` section in the config."
        )
    if formatting_func is not None:
        from tunesmith.data.pipeline import check_formatting_func_options

        check_formatting_func_options(args.completion_only_loss)


def _set_pad_token(tokenizer, args: SFTConfig) -> None:
    if args.pad_token is not None:
        tokenizer.pad_token = args.pad_token
    elif getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        # padding positions are never trained, so reusing eos as pad changes nothing in the loss
        tokenizer.pad_token = tokenizer.eos_token


def _prepare(dataset, tokenizer, args: SFTConfig, formatting_func, packing: bool, name: str, stats=None):
    if dataset is None:
        return None
    import datasets

    from tunesmith.data.pipeline import prepare_dataset
    from tunesmith.data.vision import is_processor, prepare_vision_dataset

    if is_processor(tokenizer):  # a vision-language model: images are processed per batch by the collator
        _notice_vision_settings(args)
        prepared = prepare_vision_dataset(dataset, tokenizer, max_length=args.max_length)
        logger.debug("%s dataset: %s", name, prepared.stats)
        if stats is not None:
            stats[name] = prepared.stats  # VisionStats: .summary() as DataStats
        return prepared

    _refuse_images_without_processor(dataset, name)
    # an IterableDataset is tokenized (and packed) lazily, as it streams
    settings = DataSettings.from_config(args, packing=packing).replace(
        streaming=isinstance(dataset, datasets.IterableDataset)
    )
    prepared = prepare_dataset(dataset, tokenizer, settings, formatting_func=formatting_func)
    logger.debug("%s dataset: %s", name, prepared.stats)
    if stats is not None:
        stats[name] = prepared.stats
    data = prepared.dataset
    if isinstance(data, datasets.Dataset) and "example_index" not in data.column_names:
        # carried through the collator so that a non-finite loss can name the rows that caused it
        data = data.add_column("example_index", list(range(len(data))))
    return data


def _refuse_images_without_processor(dataset, name: str) -> None:
    """Rows with images given with a plain tokenizer: say what to pass, instead of failing in the text path."""
    import datasets

    from tunesmith.data.vision import is_vision_example

    if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict):
        first = dataset[0]
    elif isinstance(dataset, datasets.Dataset) and len(dataset):
        first = dataset[0]
    else:
        return
    if is_vision_example(first):
        raise ValueError(
            f"SFTTrainer: the {name} data has images, but processing_class is a tokenizer; pass the model's "
            "processor (processing_class=AutoProcessor.from_pretrained(...)), or leave it unset for a "
            "vision-language model given by name"
        )


def _is_processor(processing_class) -> bool:
    from tunesmith.data.vision import is_processor

    return is_processor(processing_class)


def _notice_vision_settings(args: SFTConfig) -> None:
    """Vision data is padded per batch and trains on assistant turns (or the completion) only: say so once
    when the config asks for something else, instead of ignoring it silently."""
    ignored = []
    if args.packing:
        ignored.append("packing=True (vision examples are padded per batch by the processor, not packed)")
    if args.train_on_inputs or args.completion_only_loss is False or args.assistant_only_loss is False:
        ignored.append("training on prompts (vision data trains on assistant turns / the completion only)")
    if args.padding_free:
        ignored.append("padding_free=True (the processor pads each batch)")
    if ignored:
        notice_once("vision_settings", "vision-language data: ignoring " + "; ".join(ignored))


def _default_collator(model, tokenizer, args: SFTConfig):
    """Padding-free (exact, only faster) unless `padding_free=False`; padding-free batches get
    per-document attention so that flattened or packed documents never see each other."""
    from tunesmith.data.collate import PaddedCollator, PaddingFreeCollator
    from tunesmith.data.vision import VisionCollator, is_processor

    if is_processor(tokenizer):
        # the processor pads and batches the pixel tensors as the family's model expects
        return VisionCollator(tokenizer, args.pad_to_multiple_of)
    if args.padding_free is False:
        if args.packing:
            logger.warning(
                "packing with padding_free=False: the documents of a packed row attend to each other "
                "(one attention mask per row); leave padding_free unset to keep them apart"
            )
        return PaddedCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)
    if args.attention in ("auto", "tunesmith_varlen"):
        from tunesmith.ops.attention import use_varlen_attention

        use_varlen_attention(model)
    multiple = args.pad_to_multiple_of
    if multiple is None and args.device.type == "cpu":
        multiple = CPU_PAD_TO_MULTIPLE_OF
    return PaddingFreeCollator(getattr(tokenizer, "pad_token_id", None), multiple)


def _no_batch_dispatch_for_streams(args: SFTConfig, *datasets_) -> None:
    """accelerate's default for an IterableDataset reads batches on one process and slices every
    tensor of the batch along dim 0, which cuts the (D+1,) `cu_seq_lens` of a padding-free batch
    to its first entry: have each process read its own shard of batches instead."""
    import datasets

    flat = [d for item in datasets_ for d in (item.values() if isinstance(item, dict) else [item])]
    if (
        any(isinstance(d, datasets.IterableDataset) for d in flat)
        and args.accelerator_config.dispatch_batches is None
    ):
        args.accelerator_config.dispatch_batches = False


def _prepare_tokenizer(tokenizer, model, args: SFTConfig):
    """The given tokenizer, or the model's; with a pad token and the configured chat template. A
    vision-language model gets its processor (`AutoProcessor`), whose tokenizer is set up the same way."""
    from tunesmith.data.vision import is_processor
    from tunesmith.models.vision import is_vision_model

    if tokenizer is None and is_vision_model(model):
        from tunesmith.models.vision import load_processor

        tokenizer = load_processor(_model_name(model), trust_remote_code=args.trust_remote_code)
    if is_processor(tokenizer):
        _set_pad_token(tokenizer.tokenizer, args)
        if args.chat_template is not None or args.chat_template_path is not None:
            from tunesmith.data.templates import resolve_chat_template

            tokenizer.chat_template = resolve_chat_template(
                tokenizer.tokenizer,
                chat_template=args.chat_template,
                chat_template_path=args.chat_template_path,
            )
        return tokenizer
    if tokenizer is None:
        from tunesmith.models.load import load_tokenizer

        tokenizer = load_tokenizer(
            _model_name(model),
            trust_remote_code=args.trust_remote_code,
            pad_token=args.pad_token,
            eos_token=args.eos_token,
        )
    _set_pad_token(tokenizer, args)
    if args.chat_template is not None or args.chat_template_path is not None:
        from tunesmith.data.templates import resolve_chat_template

        # set on the tokenizer so that generation and the saved tokenizer use the template we train with
        tokenizer.chat_template = resolve_chat_template(
            tokenizer, chat_template=args.chat_template, chat_template_path=args.chat_template_path
        )
    return tokenizer


def _prepare_datasets(train_dataset, eval_dataset, tokenizer, args: SFTConfig, formatting_func, stats=None):
    """Both splits through `prepare_dataset`; the eval split packed as `eval_packing` says."""
    from tunesmith.data.mixture import is_mixture

    if args.datasets or is_mixture(train_dataset):
        return _prepare_mixture(train_dataset, eval_dataset, tokenizer, args, formatting_func)
    train_dataset = _prepare(train_dataset, tokenizer, args, formatting_func, args.packing, "train", stats)
    return train_dataset, _prepare_eval(eval_dataset, tokenizer, args, formatting_func)


def _generation_evaluator(trainer, args: SFTConfig, skip_prepare: bool):
    """eval_generation and early stopping wired in: the evaluator (or None), the final evaluation and the
    EarlyStoppingCallback; a metric_for_best_model that no evaluation logs is refused here."""
    from tunesmith.evaluation import (
        FinalEvaluationCallback,
        GenerationEvaluator,
        GenerationSettings,
        check_best_metric,
    )

    evaluator = None
    settings = GenerationSettings.parse(args.eval_generation)
    if settings is not None:
        if trainer.eval_dataset is None or skip_prepare:
            raise ValueError(
                "eval_generation needs a prepared eval set: pass eval_dataset (or give a source of `datasets` an "
                "`eval` / `eval_examples`)"
            )
        evaluator = GenerationEvaluator.from_eval_datasets(
            settings, trainer.eval_dataset, trainer.processing_class
        )
        trainer.add_callback(FinalEvaluationCallback(evaluator))
    check_best_metric(args, trainer.eval_dataset, evaluator, trainer.compute_metrics)
    if args.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(
            EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold)
        )
    return evaluator


def _prepare_mixture(train_dataset, eval_dataset, tokenizer, args: SFTConfig, formatting_func):
    """Several sources (`args.datasets`, or a dict / DatasetSource list as train_dataset) mixed by weight
    (`data.mixture`); their eval sets become a dict {source name: rows}, so metrics are eval_<name>_loss. A
    given eval_dataset joins them (a single one under the name "main")."""
    from tunesmith.data.mixture import prepare_mixture

    if args.datasets and train_dataset is not None:
        raise ValueError(
            "SFTTrainer: both `datasets` (in the config) and train_dataset are given; pass the sources one way"
        )
    mixture = prepare_mixture(
        args.datasets or train_dataset, tokenizer, DataSettings.from_config(args),
        eval_packing=args.eval_packing, formatting_func=formatting_func,
    )  # fmt: skip
    train = mixture.dataset.add_column("example_index", list(range(len(mixture.dataset))))
    evals = dict(mixture.eval_datasets)
    given = (
        _prepare_eval(eval_dataset, tokenizer, args, formatting_func) if eval_dataset is not None else None
    )
    if isinstance(given, dict):
        evals.update(given)
    elif given is not None:
        evals["main"] = given
    train.mixture_stats = mixture.stats  # read by SFTTrainer.__init__ (the report's per-source lines)
    return train, (evals or None)


def _prepare_eval(eval_dataset, tokenizer, args: SFTConfig, formatting_func):
    """An eval split (or a dict of them) through `prepare_dataset`, packed as `eval_packing` says;
    one that is already prepared (has `input_ids` and `seq_lengths`) is returned as it is."""
    eval_packing = args.packing if args.eval_packing is None else args.eval_packing
    if isinstance(eval_dataset, dict):
        return {
            name: _prepare_eval_one(ds, tokenizer, args, formatting_func, eval_packing, f"eval[{name}]")
            for name, ds in eval_dataset.items()
        }
    return _prepare_eval_one(eval_dataset, tokenizer, args, formatting_func, eval_packing, "eval")


def _prepare_eval_one(dataset, tokenizer, args, formatting_func, packing, name):
    columns = getattr(dataset, "column_names", None) or []
    if {"input_ids", "seq_lengths"} <= set(columns):
        return dataset  # prepared already (by this trainer's constructor or prepare_dataset)
    from tunesmith.data.vision import VisionDataset

    if isinstance(dataset, VisionDataset):
        return dataset
    return _prepare(dataset, tokenizer, args, formatting_func, packing, name)


class _WithExampleIndex:
    """Wraps a collator: takes `example_index` out of each row and puts the list on the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if features and isinstance(features[0], dict) and "example_index" in features[0]:
            features = [dict(f) for f in features]
            indices = [f.pop("example_index") for f in features]
            batch = self.collator(features)
            batch["example_index"] = indices
            return batch
        return self.collator(features)
