"""`tunesmith merge` and `tunesmith export`: a LoRA adapter merged into safetensors; GGUF and Ollama files."""

from __future__ import annotations

from pathlib import Path

from tunesmith.cli.run_config import UsageError, _apply_threads, _need_folder


def cmd_merge(args) -> int:
    from tunesmith.export import merge_adapter

    _need_folder(args.adapter)
    _apply_threads()
    out = merge_adapter(args.adapter, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args) -> int:
    from tunesmith.export import export_gguf

    _need_folder(args.model)
    if args.gguf is None and args.ollama is None:
        raise UsageError("export: give --gguf FILE, --ollama DIR, or both")
    _apply_threads()
    gguf = (
        Path(args.gguf)
        if args.gguf
        else Path(args.ollama) / f"{Path(args.model).resolve().name}-{args.type}.gguf"
    )
    out = export_gguf(
        args.model, gguf, type=args.type, pre_tokenizer=args.pre_tokenizer, max_shard_size=args.max_shard_size
    )
    shards = (
        sorted(out.parent.glob(out.name.replace("-00001-of-", "-*-of-")))
        if "-00001-of-" in out.name
        else [out]
    )
    size = sum(p.stat().st_size for p in shards) / 2**20
    where = f"{out} (+ {len(shards) - 1} more shards)" if len(shards) > 1 else str(out)
    print(f"GGUF ({args.type}) written to {where} ({size:.1f} MiB)")
    print(f"  run it in llama.cpp: llama-cli -m {out} -cnv   (or llama-server -m {out})")
    if args.ollama:
        from tunesmith.export.ollama import write_modelfile

        modelfile = write_modelfile(args.model, args.ollama, out)
        print(f"Ollama Modelfile written to {modelfile}")
        print(f"  run it in Ollama: ollama create my-model -f {modelfile} && ollama run my-model")
        if len(shards) > 1:
            print(
                "  note: Ollama releases before split-GGUF import (ollama/ollama#5245) refuse sharded files; "
                "for those, export without --max-shard-size"
            )
    return 0
