"""What runs beside the training step: the non-finite loss guard, clean stop on SIGINT/SIGTERM,
sample generations at each evaluation, and a one-line progress log."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time

import torch
from transformers import TrainerCallback

__all__ = [
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "SignalCheckpointCallback",
    "TrainingStopped",
    "SampleGenerationCallback",
    "ProgressLineCallback",
    "no_save_progress_bars",
    "progress_lines_only",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch's rows."""


class NonFiniteLossGuard:
    """Stops training at the first micro-batch whose loss is NaN or infinite, before its backward
    (so no NaN gradient reaches the weights), naming the optimizer step and the batch's rows."""

    def check(self, loss_sum: torch.Tensor, step: int, example_index=None) -> None:
        # one device sync per micro-batch; cheap next to a forward and backward
        if bool(torch.isfinite(loss_sum.detach())):
            return
        rows = (
            "unknown rows (the batch carried no example_index)"
            if example_index is None
            else f"rows {list(example_index)}"
        )
        raise NonFiniteLossError(
            f"training stopped: the loss is {loss_sum.item()} at optimizer step {step + 1}; the batch holds "
            f"{rows} of the prepared training set. Look at those examples (`tunesmith inspect`), lower "
            "the learning rate or enable max_grad_norm, or train in float32 / bf16 rather than fp16."
        )

    def check_grad_norm(
        self, grad_norm, step: int, rows, *, learning_rate: float, max_grad_norm: float
    ) -> None:
        """Stops before the optimizer step when the gradient norm of optimizer step `step + 1` is NaN or
        infinite (the loss can still be finite), so that update is never applied; `rows` are the prepared
        training set's rows of every micro-batch of that step."""
        value = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm)
        if math.isfinite(value):
            return
        where = f"rows {sorted(rows)}" if rows else "unknown rows (the batches carried no example_index)"
        fix = (
            f"lower the learning rate (now {learning_rate:g})"
            if max_grad_norm and max_grad_norm > 0
            else f"set max_grad_norm (now {max_grad_norm}) to clip gradients, or lower the learning rate "
            f"(now {learning_rate:g})"
        )
        raise NonFiniteLossError(
            f"training stopped: the gradient norm is {value} at optimizer step {step + 1} (before its update, "
            f"which was not applied; the weights are those after step {step}); the step's batches hold {where} "
            f"of the prepared training set. Look at those examples (`tunesmith inspect`), {fix}, or train in "
            "float32 / bf16 rather than fp16."
        )


class SignalCheckpointCallback(TrainerCallback):
    """On SIGINT or SIGTERM: finish the current optimizer step, save a checkpoint, stop cleanly.

    A second signal falls through to the previous handler (Ctrl-C twice still interrupts at once).
    `interrupted` says whether the run was stopped this way.
    """

    def __init__(self):
        self.interrupted = False
        self.signal_name: str | None = None  # "SIGTERM" / "SIGINT" once one arrived
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.interrupted = False
        self.signal_name = None
        if not _in_main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.interrupted = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s received: saving a checkpoint after this step, then stopping", signal.Signals(signum).name
        )
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class TrainingStopped(Exception):
    """A run stopped by SIGINT / SIGTERM before its last step (raised by the CLI after saving, so that it
    exits with `exit_status`, 128 + the signal's number, as a shell reports a process killed by it)."""

    def __init__(self, signal_name: str, step: int, total: int, resume: str):
        self.signal_name, self.step, self.total = signal_name, step, total
        self.exit_status = 128 + int(signal.Signals[signal_name])
        super().__init__(f"stopped at step {step} of {total} ({signal_name}); resume with `{resume}`")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class ReleaseHostMemoryCallback(TrainerCallback):
    """Every `every` optimizer steps on the CPU, hand the heap's free memory back to the OS.

    glibc's allocator keeps what a step frees. Trimming after every step (`malloc_trim(0)`) kept
    the resident size between steps near the live memory, but the next step faulted every page in
    again: in a LoRA run on SmolLM2 (2 cores) that was 7.3 M page faults and 13 s of system time in
    90 s, 7% of the speed, for a peak only 0.09 GB lower (2.12 vs 2.21 GB: the peak is set inside a
    step, where trimming cannot reach). Every 10 steps costs a tenth of that and still returns what
    an unusually long batch left behind. Does nothing where the C library has no malloc_trim (macOS,
    musl).
    """

    def __init__(self, every: int = 10):
        self._trim = _malloc_trim()
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if self._trim is not None and state.global_step % self.every == 0:
            self._trim(0)


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class SampleGenerationCallback(TrainerCallback):
    """Greedy generations from a few prompts at every evaluation, and after the last step when no
    evaluation follows it (so `sample_prompts` always shows something, even without an eval set).

    Each generation is printed (to `stream`, default stdout), kept in `samples` as (step, prompt, text),
    and appended to `state.log_history` as {"step", "sample_prompt", "sample_output"}: `MetricsCallback`
    writes those records to metrics.jsonl, `report.samples_from_history` reads them for report.md, and
    they are saved with every checkpoint's trainer state (so a resumed run's report keeps them)."""

    def __init__(self, prompts, max_new_tokens: int = 64, chat_template_kwargs=None, stream=None):
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.chat_template_kwargs = chat_template_kwargs
        self.stream = stream
        self.samples: list[tuple[int, object, str]] = []

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._generate(state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        # the last step, when no evaluation follows it (DefaultFlowCallback has decided that already);
        # here rather than at on_train_end so that MetricsCallback still writes them
        if state.global_step >= state.max_steps and not control.should_evaluate:
            self._generate(state, model, processing_class)

    def _generate(self, state, model, processing_class) -> None:
        if model is None or processing_class is None or not state.is_world_process_zero:
            return
        from tunesmith.generation import generate

        texts = generate(
            model,
            processing_class,
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        stream = self.stream or sys.stdout
        for prompt, text in zip(self.prompts, texts):
            self.samples.append((state.global_step, prompt, text))
            state.log_history.append(
                {"step": state.global_step, "sample_prompt": prompt, "sample_output": text}
            )
            logger.info("sample at step %d\n  prompt: %s\n  output: %s", state.global_step, prompt, text)
            print(
                f"sample at step {state.global_step}\n  prompt: {prompt}\n  output: {text}",
                file=stream,
                flush=True,
            )


def progress_lines_only(trainer) -> None:
    """Make `ProgressLineCallback`'s lines the only progress display: Trainer's own (a tqdm bar, or the
    printed log dicts with disable_tqdm) would show the same numbers twice more, interleaved."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not any(isinstance(c, ProgressLineCallback) for c in trainer.callback_handler.callbacks):
        trainer.add_callback(ProgressLineCallback())


@contextlib.contextmanager
def no_save_progress_bars():
    """transformers draws a "Writing model shards" bar for every checkpoint, between the progress lines."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class ProgressLineCallback(TrainerCallback):
    """One line per log: step/total, loss, token accuracy, tokens/s and ETA (for plain logs and the CLI);
    one per evaluation: eval loss and accuracy. The ETA counts the steps of this run only (after a resume,
    not the checkpoint's)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._start_step = state.global_step  # a resumed run starts past 0: its speed is counted from here

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            parts = [
                f"step {state.global_step}/{max(state.max_steps, 1)}",
                f"eval loss {logs['eval_loss']:.4f}",
            ]
            if "eval_mean_token_accuracy" in logs:
                parts.append(f"eval acc {logs['eval_mean_token_accuracy']:.3f}")
            print(" | ".join(parts), file=self.stream, flush=True)
        if "loss" not in logs:
            return
        step, total = state.global_step, max(state.max_steps, 1)
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        done = step - getattr(self, "_start_step", 0)
        eta = elapsed / max(done, 1) * (total - step)
        parts = [f"step {step}/{total}", f"loss {logs['loss']:.4f}"]
        if "mean_token_accuracy" in logs:
            parts.append(f"acc {logs['mean_token_accuracy']:.3f}")
        if "tokens_per_second" in logs:
            parts.append(f"{logs['tokens_per_second']:.0f} tok/s")
        parts.append(f"eta {_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
