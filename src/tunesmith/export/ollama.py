"""An Ollama `Modelfile` beside the GGUF: the chat template in Ollama's Go template syntax, the stop
tokens and sampling PARAMETERs.

A Jinja chat template cannot be translated to Go in general, but the chat formats of the supported
families are all one shape: an optional start (bos), then per message a fixed prefix, the content
and a fixed suffix for its role, the system message either as a turn of its own or joined to the
first user message, and a prefix that starts the assistant's answer. The shape is read off the
template by rendering it on probe conversations, the Go template is built from it, and the shape is
checked by rendering both on several conversations: a template that does not fit raises
ExportError instead of producing a Modelfile that prompts the model differently from training.

    TEMPLATE for chatml (SmolLM2, Qwen):
    {{ range $i, $m := .Messages }}{{ if eq .Role "system" }}<|im_start|>system
    {{ .Content }}<|im_end|>
    {{ else if eq .Role "user" }}<|im_start|>user
    {{ .Content }}<|im_end|>
    ...
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tunesmith.export.errors import ExportError

logger = logging.getLogger(__name__)

# probe contents: distinct, and text no template adds by itself
_S, _U1, _A1, _U2, _A2, _U3 = (f"\u2063{name}\u2063" for name in ("S", "U1", "A1", "U2", "A2", "U3"))


@dataclass(frozen=True)
class ChatFormat:
    """The shape of a chat template (see the module docstring); every field is literal text."""

    start: str  # before the first message (e.g. bos)
    user: tuple[str, str]  # (prefix, suffix)
    assistant: tuple[str, str]
    system: tuple[str, str] | None  # None: the system message is joined to the first user message
    # between a joined system message and the user's content; None: the template refuses system
    # messages (Gemma 1/2 raise on one), and the Go template leaves them out
    system_join: str | None
    generation: str  # after the last user message: starts the answer
    default_system: str  # what the template puts in when there is no system message ("" for nothing)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """What the Go template renders (the reference the Go text is checked against)."""
        out, system = [self.start], ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        elif self.default_system:
            system = self.default_system
        if system and self.system is not None:
            out += [self.system[0], system, self.system[1]]
        joined = False
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            if message["role"] == "user":
                content = message["content"]
                if system and self.system is None and self.system_join is not None and not joined:
                    content, joined = system + self.system_join + content, True
                out += [self.user[0], content, self.user[1]]
                if last and add_generation_prompt:
                    out.append(self.generation)
            else:
                out += [self.assistant[0], message["content"]]
                if not last:
                    out.append(self.assistant[1])
        return "".join(out)


def _between(text: str, left: str, right: str) -> str:
    i = text.index(left) + len(left) if left else 0
    return text[i : text.index(right, i)] if right else text[i:]


def read_chat_format(render) -> ChatFormat:
    """The ChatFormat of a template; `render(messages, add_generation_prompt)` renders it.

    Raises ExportError (with what did not fit) when the template is not of that shape."""
    try:
        return _read(render)
    except (ValueError, IndexError, KeyError) as error:
        raise ExportError(
            f"the chat template does not fit the per-role prefix/suffix shape a Modelfile TEMPLATE is built "
            f"from ({error}); write the TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)"
        ) from error


def _msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def _read(render) -> ChatFormat:
    conv = _msgs(("user", _U1), ("assistant", _A1), ("user", _U2))
    nosys = render(conv, False)
    with_gen = render(conv, True)
    if not with_gen.startswith(nosys):
        raise ValueError("the generation prompt is not text appended at the end")
    generation = with_gen[len(nosys) :]
    user_suffix = nosys[nosys.index(_U2) + len(_U2) :]
    two = render(_msgs(("user", _U1), ("assistant", _A1)), False)
    assistant_suffix = two[two.index(_A1) + len(_A1) :]
    between = _between(nosys, _U1, _A1)  # user suffix + assistant prefix
    if not between.startswith(user_suffix):
        raise ValueError(f"user turns end differently ({user_suffix!r} vs {between!r})")
    assistant_prefix = between[len(user_suffix) :]
    between = _between(nosys, _A1, _U2)  # assistant suffix + user prefix
    if not between.startswith(assistant_suffix):
        raise ValueError(f"assistant turns end differently ({assistant_suffix!r} vs {between!r})")
    user_prefix = between[len(assistant_suffix) :]
    head = nosys[: nosys.index(_U1)]  # start (+ default system turn) + user prefix
    if not head.endswith(user_prefix):
        raise ValueError(f"the first user turn starts differently ({head!r})")
    head = head[: len(head) - len(user_prefix)]

    try:
        sys = render([{"role": "system", "content": _S}, *conv], False)
    except Exception as error:  # jinja's raise_exception: no system role at all
        logger.warning(
            "the chat template refuses a system message (%s); the Modelfile leaves them out", error
        )
        sys = None
    if sys is None:
        splits = [(head, None, None)]
    else:
        if sys.index(_S) > sys.index(_U1):
            raise ValueError("the system message comes after the first user message")
        before_s, after_s = sys[: sys.index(_S)], _between(sys, _S, _U1)
    if sys is None:
        pass
    elif before_s.endswith(user_prefix) and not after_s.endswith(user_prefix):
        # joined to the first user message (Gemma, Mistral)
        splits = [(before_s[: len(before_s) - len(user_prefix)], None, after_s)]
    else:
        if not after_s.endswith(user_prefix):
            raise ValueError(f"no user turn follows the system turn ({after_s!r})")
        system_suffix = after_s[: len(after_s) - len(user_prefix)]
        # where the start ends and the system prefix begins: the shortest start that fits
        splits = [(before_s[:cut], (before_s[cut:], system_suffix), "") for cut in range(len(before_s) + 1)]
    problems = []
    for start, system, join in splits:
        if not head.startswith(start):
            continue
        default = ""
        if head != start:  # the template adds a system message of its own when there is none
            if system is None or not head.startswith(start + system[0]) or not head.endswith(system[1]):
                problems.append(f"unexpected text before the first user turn ({head!r})")
                continue
            default = head[len(start + system[0]) : len(head) - len(system[1])]
        fmt = ChatFormat(
            start=start,
            user=(user_prefix, user_suffix),
            assistant=(assistant_prefix, assistant_suffix),
            system=system,
            system_join=join,
            generation=generation,
            default_system=default,
        )
        try:
            _check(fmt, render)
        except ValueError as error:
            problems.append(str(error))
            continue
        return fmt
    raise ValueError(problems[-1] if problems else f"unexpected text before the first user turn ({head!r})")


_CHECKS = [
    _msgs(("user", "hi")),
    _msgs(("system", "be brief"), ("user", "hi")),
    _msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
    _msgs(
        ("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e")
    ),
    _msgs(("user", "a"), ("assistant", "b")),
]


def _check(fmt: ChatFormat, render) -> None:
    for messages in _CHECKS:
        for gen in (True, False):
            if messages[-1]["role"] == "assistant" and gen:
                continue
            if fmt.system_join is None and messages[0]["role"] == "system":
                continue  # the template refuses these
            expected, got = render(messages, gen), fmt.render(messages, add_generation_prompt=gen)
            if messages[-1]["role"] == "assistant":  # Ollama continues a last assistant message
                got += fmt.assistant[1]
            if expected != got:
                raise ValueError(f"on {messages} it renders {expected!r}, the shape gives {got!r}")


def _go_string(text: str) -> str:
    """Literal text inside a Go template: as is, except the action delimiters."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: ChatFormat, *, drop_start: str = "") -> str:
    """Ollama's TEMPLATE (Go text/template over .Messages) for `fmt`. `drop_start`: text at the start
    the runtime adds itself (bos when the GGUF says add_bos), left out of the template."""
    g = _go_string
    start = fmt.start[len(drop_start) :] if drop_start and fmt.start.startswith(drop_start) else fmt.start
    last = "(eq (len (slice $.Messages $i)) 1)"
    parts = [g(start)]
    if fmt.system is None and fmt.system_join is not None:
        parts.append('{{ $system := "" }}{{ $joined := false }}')
        parts.append(
            '{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
        )
    parts.append("{{ range $i, $m := .Messages }}")
    if fmt.system is not None:
        parts.append(
            f'{{{{ if eq .Role "system" }}}}{{{{ if eq $i 0 }}}}{g(fmt.system[0])}{{{{ .Content }}}}{g(fmt.system[1])}{{{{ end }}}}'
        )
        parts.append('{{ else if eq .Role "user" }}')
    else:
        parts.append('{{ if eq .Role "user" }}')
    parts.append(g(fmt.user[0]))
    if fmt.system is None and fmt.system_join is not None:
        parts.append(
            f"{{{{ if and $system (not $joined) }}}}{{{{ $system }}}}{g(fmt.system_join)}{{{{ $joined = true }}}}{{{{ end }}}}"
        )
    parts.append(f"{{{{ .Content }}}}{g(fmt.user[1])}{{{{ if {last} }}}}{g(fmt.generation)}{{{{ end }}}}")
    parts.append(f'{{{{ else if eq .Role "assistant" }}}}{g(fmt.assistant[0])}{{{{ .Content }}}}')
    parts.append(f"{{{{ if not {last} }}}}{g(fmt.assistant[1])}{{{{ end }}}}")
    parts.append("{{ end }}{{ end }}")
    return "".join(parts)


def stop_tokens(fmt: ChatFormat, tokenizer) -> list[str]:
    """The special tokens that end a turn (in the assistant suffix), then eos."""
    specials = [t for t in tokenizer.all_special_tokens if t]
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    stops = [t for t in dict.fromkeys(specials + added) if t in fmt.assistant[1]]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def _quote(text: str) -> str:
    return '"""' + text + '"""' if "\n" in text or '"' in text else f'"{text}"'


def modelfile(
    gguf_name: str, tokenizer, *, context_length: int, generation_config: dict | None = None
) -> str:
    """The text of a Modelfile for the GGUF file `gguf_name` ("./model.gguf": beside the Modelfile)."""
    from tunesmith.export.gguf_vocab import adds_bos_eos

    if not isinstance(tokenizer.chat_template, str):
        raise ExportError("the tokenizer has no chat template: Ollama's TEMPLATE is made from it")

    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    fmt = read_chat_format(render)
    add_bos, _ = adds_bos_eos(tokenizer)
    drop = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""
    template = go_template(fmt, drop_start=drop)
    if '"""' in template:
        raise ExportError('the chat template contains """, which a Modelfile cannot quote')
    lines = [
        "# Written by tunesmith. Run with: ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM {gguf_name}",
        f'TEMPLATE """{template}"""',
    ]
    if fmt.default_system:
        lines.append(f"SYSTEM {_quote(fmt.default_system)}")
    for stop in stop_tokens(fmt, tokenizer):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    lines.append(f"PARAMETER num_ctx {min(context_length, 8192)}")
    gen = generation_config or {}
    sampling = gen.get("do_sample", False)
    # the model's own generation defaults; greedy (temperature 0) when it samples by none
    lines.append(f"PARAMETER temperature {gen.get('temperature', 1.0) if sampling else 0}")
    for key, name in (("top_p", "top_p"), ("top_k", "top_k"), ("repetition_penalty", "repeat_penalty")):
        if sampling and gen.get(key) is not None:
            lines.append(f"PARAMETER {name} {gen[key]}")
    return "\n".join(lines) + "\n"


def write_modelfile(model_dir: str | Path, out_dir: str | Path, gguf_path: str | Path) -> Path:
    """Write `out_dir/Modelfile` for the GGUF at `gguf_path`, exported from `model_dir` (a model
    folder, or an adapter folder: its own tokenizer when it saved one, its base model's config)."""
    from transformers import AutoConfig

    from tunesmith.export.merge import _load_tokenizer, is_adapter_dir

    model_dir, out_dir, gguf_path = Path(model_dir), Path(out_dir), Path(gguf_path)
    folders = [model_dir]
    if is_adapter_dir(model_dir):
        from tunesmith.models.load import _resolve_source

        base = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        folders.append(Path(_resolve_source(base, None)))
    config = AutoConfig.from_pretrained(folders[-1])
    gen_file = folders[-1] / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    target, folder = gguf_path.resolve(), out_dir.resolve()
    reference = f"./{target.relative_to(folder).as_posix()}" if target.is_relative_to(folder) else str(target)
    text = modelfile(
        reference,
        _load_tokenizer(*folders),
        context_length=config.max_position_embeddings,
        generation_config=generation,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "Modelfile"
    tmp = path.with_name(".Modelfile.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
