"""SFTTrainer: a thin `transformers.Trainer` for supervised fine-tuning, drop-in for TRL 1.x's.

`__init__` keeps TRL's constructor (old spellings `tokenizer=`, `max_seq_length=`, ... still work, once
noticed) and gets its pieces from `tunesmith.build`: the model (load, LoRA, fast modules, memory
policy), the tokenizer, the prepared datasets and the collator. What the class itself adds:

- `compute_loss` reads top to bottom: the model to its final hidden states (no logits), the fused
  `linear_cross_entropy` against `shift_labels`, divided by the supervised tokens of the whole
  optimizer step, then metrics (`tunesmith.loss` has the pieces).
- `prediction_step` / `evaluation_loop`: eval loss weighted by tokens (independent of batch size).
- `create_optimizer`: parameter groups (embedding learning rate, no decay on norms and biases).
- `log`: token accuracy, entropy (computed inside the fused loss), tokens seen, tokens per second,
  supervised tokens.
- saving, crash-safe (`tunesmith.saving.CrashSafeSaving`, a mixin).

Under FSDP or DeepSpeed the LM head's weight is sharded outside the forward, so there the loss is
computed from the logits the model returns (`logits_loss_sum`): the same value, without the fused
loss's memory saving.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

from tunesmith.build.collator import WithExampleIndex, build_collator
from tunesmith.build.config import (
    apply_old_kwargs,
    as_sft_config,
    check_before_work,
    fall_back_from_bitsandbytes,
    seed_everything,
)
from tunesmith.build.data import build_datasets, build_eval, no_batch_dispatch_for_streams
from tunesmith.build.model import build_model, set_batch_attention
from tunesmith.build.tokenizer import build_tokenizer
from tunesmith.callbacks import (
    NonFiniteLossGuard,
    ReleaseHostMemoryCallback,
    SampleGenerationCallback,
    SignalCheckpointCallback,
)
from tunesmith.common import IGNORE_INDEX
from tunesmith.config import SFTConfig
from tunesmith.evaluation import wire_generation_eval
from tunesmith.loss import (
    FORWARD_KEYS,
    TokenCounters,
    ensure_shift_labels,
    final_hidden_states,
    final_logit_softcap,
    lm_head_parameters,
    logits_loss_sum,
    loss_impl,
    real_tokens,
)
from tunesmith.saving import CrashSafeSaving

__all__ = ["SFTTrainer", "UnslothTrainer", "final_hidden_states", "lm_head_parameters", "logits_loss_sum"]

logger = logging.getLogger(__name__)


# Columns of a prepared dataset that the collators read (Trainer drops any other column).
_DATASET_COLUMNS = ["input_ids", "labels", "seq_lengths", "example_index", "attention_mask", "position_ids"]
# ... and the rows of a prepared vision dataset (data.vision.VisionDataset)
_VISION_ROW_COLUMNS = ["text", "text_ids", "trained", "images", "image_sizes", "length", "image_tokens"]


class SFTTrainer(CrashSafeSaving, Trainer):
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
        args = as_sft_config(args, model)
        max_length_given = "max_seq_length" in old_kwargs
        processing_class = apply_old_kwargs(args, processing_class, old_kwargs)
        check_before_work(args, train_dataset, formatting_func)
        model_max_length = getattr(model, "max_seq_length", None)  # set by FastLanguageModel
        if model_max_length and args.max_length == SFTConfig.max_length and not max_length_given:
            logger.info("using the model's max_seq_length=%d as max_length", model_max_length)
            args.max_length = int(model_max_length)
        fall_back_from_bitsandbytes(args)

        # Seed before anything random is made (LoRA's initialisation, a model loaded by name), not only in
        # Trainer.__init__ below, which runs after: two runs of one config then agree from step 1.
        seed_everything(args)
        model, self.memory_policy = build_model(model, args, peft_config)
        processing_class = build_tokenizer(processing_class, model, args)
        skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset"))
        # what prepare_dataset did to each split (examples in/out, truncated, dropped, how files were read)
        self.data_stats: dict = {}
        # TRL's vision recipe: a processor and the user's own collator, which reads the raw rows
        from tunesmith.data.vision import is_processor

        raw_vision = data_collator is not None and is_processor(processing_class)
        skip_prepare = skip_prepare or raw_vision
        if not skip_prepare:
            train_dataset, eval_dataset = build_datasets(
                train_dataset, eval_dataset, processing_class, args, formatting_func, stats=self.data_stats
            )
        self.mixture_stats = getattr(
            train_dataset, "mixture_stats", None
        )  # several sources: per-source lines
        # evaluate(eval_dataset=raw) prepares it as the constructor's eval_dataset
        self._formatting_func, self._skip_prepare = formatting_func, skip_prepare
        if data_collator is None:
            set_batch_attention(model, processing_class, args)
            data_collator = build_collator(processing_class, args)
        no_batch_dispatch_for_streams(args, train_dataset, eval_dataset)
        data_collator = WithExampleIndex(data_collator)

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
        self._window = TokenCounters(self.args.device)
        self._window_start = time.perf_counter()
        self._eval_totals: torch.Tensor | None = None
        self.generation_eval = wire_generation_eval(self, args, skip_prepare)

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
        ensure_shift_labels(inputs)
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
            self._window.add(loss_sum, num_correct, num_supervised, real_tokens(inputs), entropy_sum)
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
            softcap=final_logit_softcap(model),
            dft=self.args.loss_type == "dft",
            reduction="sum",
            impl=loss_impl(self.args),
            return_entropy=self.args.log_entropy,
        )
        return out if self.args.log_entropy else (*out, torch.zeros((), device=hidden.device))

    # ------------------------------------------------------------------ evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        inputs.pop("example_index", None)
        ensure_shift_labels(inputs)
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
            forward = {k: inputs[k] for k in FORWARD_KEYS if k in inputs}
            logits = model(**forward, use_cache=False).logits
        return loss, logits, inputs["labels"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Trainer.evaluate, with a raw `eval_dataset` (or a dict of them) prepared exactly as the
        constructor prepares its `eval_dataset`: format, template, masks, `eval_packing`, cache. A dataset
        this trainer already prepared, or a name of one of its eval sets, is used as it is."""
        if eval_dataset is not None and not isinstance(eval_dataset, str) and not self._skip_prepare:
            eval_dataset = build_eval(eval_dataset, self.processing_class, self.args, self._formatting_func)
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


UnslothTrainer = SFTTrainer
