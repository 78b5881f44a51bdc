"""`tunesmith train`: a run from a YAML config (none: the built-in quick start), its report and resume line."""

from __future__ import annotations

import sys
from pathlib import Path

from tunesmith.cli.run_config import (
    QUICKSTART_DATA,
    UsageError,
    _apply_threads,
    _check_model,
    _load_source,
    read_run_config,
)


def cmd_train(args) -> int:
    if args.config and "=" in args.config and not Path(args.config).exists():
        # `tunesmith train lora.r=8`: no config file, only overrides of the quick start
        args.overrides, args.config = [args.config, *args.overrides], None
    config, data, raw = read_run_config(args.config, args.overrides)
    if config.datasets and data.train is not None:
        raise UsageError(f"{args.config}: give either `dataset` or `datasets` (several sources), not both")
    if data.train in (None, QUICKSTART_DATA) and not config.datasets:
        if args.config is not None and data.train is None:
            raise UsageError(
                f"{args.config}: no `dataset` section; add `dataset: {{train: path/to/data.jsonl}}`"
            )
        from tunesmith.quickstart import run_quickstart

        resume = _resume_command(args)
        _apply_threads(show=True)
        if args.config is None:  # the quick start's own settings plus the overrides
            run_quickstart([o for o in args.overrides if not o.startswith("dataset")], resume_command=resume)
        else:  # the file's settings, overrides applied
            run_quickstart(config=config, resume_command=resume)
        return 0

    from tunesmith.callbacks import (
        ProgressLineCallback,
        TrainingStopped,
        no_save_progress_bars,
        progress_lines_only,
    )
    from tunesmith.checkpoint import check_output_dir
    from tunesmith.report import MetricsCallback, samples_from_history, write_report
    from tunesmith.trainer import SFTTrainer

    model = _check_model(config.model_name_or_path)
    check_output_dir(
        config.output_dir, overwrite=config.overwrite_output_dir, resume=config.resume_from_checkpoint
    )
    threads = _apply_threads(show=True)
    config.save_resolved(config.output_dir)
    trainer = SFTTrainer(
        model,
        args=config,
        train_dataset=_load_source(data.train, data.split) if data.train else None,
        eval_dataset=_load_source(data.eval, data.eval_split) if data.eval else None,
        callbacks=[MetricsCallback(), ProgressLineCallback()],
    )
    progress_lines_only(trainer)
    if "train" in trainer.data_stats:  # examples in/out, truncated, dropped, how the file was read
        print(trainer.data_stats["train"].summary(), file=sys.stderr, flush=True)
    with no_save_progress_bars():
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    final = {k: v for r in trainer.state.log_history for k, v in r.items() if k in ("loss", "eval_loss")}
    notes = [f"final {k}: {v:.4f}" for k, v in final.items()] + [f"data: {data.train}", f"model: {model}"]
    if trainer.mixture_stats is not None:  # several sources: the data line per source
        notes[-2] = "data:\n\n```\n" + trainer.mixture_stats.summary() + "\n```\n"
    notes.append(threads.line())
    title = f"tunesmith run: {Path(config.output_dir).name}"
    sections = _evaluation_sections(trainer)
    generations = samples_from_history(trainer.state.log_history)
    if trainer.stopped_by:
        # not finished: no final model in output_dir (the checkpoint holds it), a report that says so
        stop = TrainingStopped(
            trainer.stopped_by, trainer.state.global_step, trainer.state.max_steps, _resume_command(args)
        )
        write_report(
            config.output_dir,
            title=f"{title} (STOPPED EARLY)",
            notes=[f"**{stop}**", *notes],
            sections=sections,
            generations=generations,
        )
        raise stop
    with no_save_progress_bars():
        trainer.save_model()
    write_report(config.output_dir, title=title, notes=notes, sections=sections, generations=generations)
    print(f"done: model and report in {config.output_dir}")
    return 0


def _resume_command(args) -> str:
    """The command line that resumes this `tunesmith train` run."""
    import shlex

    kept = [o for o in args.overrides if not o.startswith("resume_from_checkpoint=")]
    words = ["tunesmith", "train", *([args.config] if args.config else []), *kept]
    return shlex.join([*words, "resume_from_checkpoint=true"])


def _evaluation_sections(trainer) -> list[str]:
    """report.md's evaluation part: the last eval metrics per eval set, the best checkpoint, generations."""
    from tunesmith.evaluation import report_sections

    state, args = trainer.state, trainer.args
    return report_sections(
        state.log_history,
        samples=trainer.generation_eval.samples if trainer.generation_eval is not None else (),
        best_checkpoint=state.best_model_checkpoint,
        best_metric=state.best_metric,
        metric_name=args.metric_for_best_model,
    )
