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
import os
import time

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

from tunesmith.build.callbacks import build_callbacks
from tunesmith.build.config import build_args
from tunesmith.build.data import build_data, build_eval
from tunesmith.build.model import build_model
from tunesmith.build.tokenizer import build_tokenizer
from tunesmith.callbacks import NonFiniteLossGuard
from tunesmith.common import IGNORE_INDEX
from tunesmith.config import SFTConfig
from tunesmith.evaluation import wire_generation_eval
from tunesmith.loss import (
    FORWARD_KEYS,
    TokenCounters,
    ensure_shift_labels,
    eval_metrics,
    final_hidden_states,
    final_logit_softcap,
    lm_head_parameters,
    logits_loss_sum,
    loss_impl,
    real_tokens,
    train_log_metrics,
)
from tunesmith.saving import CrashSafeSaving

__all__ = ["SFTTrainer", "UnslothTrainer", "final_hidden_states", "lm_head_parameters", "logits_loss_sum"]

logger = logging.getLogger(__name__)


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
        args, processing_class = build_args(
            args, model, processing_class, train_dataset, formatting_func, old_kwargs
        )
        model, self.memory_policy = build_model(model, args, peft_config)
        processing_class = build_tokenizer(processing_class, model, args)
        data = build_data(
            train_dataset, eval_dataset, data_collator, model, processing_class, args, formatting_func
        )
        # what prepare_dataset did to each split (examples in/out, truncated, dropped, how files were read)
        self.data_stats, self.mixture_stats = data.stats, data.mixture_stats
        # evaluate(eval_dataset=raw) prepares it as the constructor's eval_dataset
        self._formatting_func, self._skip_prepare = formatting_func, data.skip_prepare

        super().__init__(
            model=model,
            args=args,
            data_collator=data.data_collator,
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
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
        if data.signature_columns is not None:
            self._signature_columns = data.signature_columns
        self.nonfinite_guard = NonFiniteLossGuard()
        self._step_rows: list[int] = []
        own_callbacks = build_callbacks(args, self.args.device)
        self._signal_stop = own_callbacks[0]  # SignalCheckpointCallback: `stopped_by` reads it
        for callback in own_callbacks:
            self.add_callback(callback)
        self._window = TokenCounters(self.args.device)
        self._window_start = time.perf_counter()
        self._eval_totals: torch.Tensor | None = None
        self.generation_eval = wire_generation_eval(self, args, data.skip_prepare)

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
            totals = self.accelerator.reduce(self._eval_totals, reduction="sum").tolist()
        finally:
            self._eval_totals = None
        output.metrics.update(eval_metrics(totals, metric_key_prefix, self.args.log_entropy))
        if getattr(self, "generation_eval", None) is not None:  # eval_generation: exact match, chrF
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
            totals = self.accelerator.reduce(self._window.totals(), "sum").tolist()
            now = time.perf_counter()
            # running totals continue from the last log (also the one restored from a checkpoint)
            last = next((e for e in reversed(self.state.log_history) if "num_tokens" in e), {})
            logs.update(train_log_metrics(totals, last, now - self._window_start, self.args.log_entropy))
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
