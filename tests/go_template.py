"""A small interpreter of Go's text/template, enough for the Modelfile TEMPLATEs tunesmith writes, so
the tests can render them without Go or Ollama.

It follows text/template's rules for what it supports, and raises on anything else (so a template
that used more would fail the test rather than render wrongly): literal text verbatim; actions
`{{ pipeline }}` with `{{-`/`-}}` trimming; `if`/`else if`/`else`/`end`; `range $i, $m := PIPE` and
`range PIPE`; `$x := v` declares, `$x = v` assigns (and reaches the enclosing scope, as in Go >= 1.11);
`.Field` of dot, `$.Field` of the root; functions eq, not, and, or, len, slice, index; string, int and
bool literals; truth as in Go (false, 0, "", empty list, nil are false).
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(expr: str) -> list[str]:
    return re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|:=|=|,|[^\s(),]+', expr)


def _parse(template: str):
    """-> a list of nodes: str | ("expr", tokens) | ("if", [(cond, body)...], else_body) | ("range", ...)"""
    pieces, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        pieces.append(("text", text))
        pieces.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    pieces.append(("text", template[pos:]))
    nodes, stack = [], []
    current = nodes
    for kind, value in pieces:
        if kind == "text":
            if value:
                current.append(value)
            continue
        words = value.split(None, 1)
        head = words[0] if words else ""
        if head == "if":
            node = ["if", [[_tokens(words[1]), []]], None]
            current.append(node)
            stack.append((node, current))
            current = node[1][0][1]
        elif head == "range":
            spec = words[1]
            names, _, pipe = spec.partition(":=") if ":=" in spec else ("", "", spec)
            node = ["range", [n.strip() for n in names.split(",") if n.strip()], _tokens(pipe), []]
            current.append(node)
            stack.append((node, current))
            current = node[3]
        elif head == "else":
            node, _ = stack[-1]
            if node[0] != "if":
                raise ValueError("else in range is not supported")
            if len(words) > 1 and words[1].startswith("if "):
                node[1].append([_tokens(words[1][3:]), []])
                current = node[1][-1][1]
            else:
                node[2] = []
                current = node[2]
        elif head == "end":
            _, current = stack.pop()
        else:
            current.append(("expr", _tokens(value)))
    if stack:
        raise ValueError("unclosed action")
    return nodes


def _truth(value) -> bool:
    return bool(value)


class _Scope:
    def __init__(self, parent=None):
        self.vars, self.parent = {}, parent

    def find(self, name):
        scope = self
        while scope is not None:
            if name in scope.vars:
                return scope
            scope = scope.parent
        raise NameError(f"undefined variable {name}")


def _eval(tokens: list[str], dot, root, scope: _Scope):
    value, rest = _eval_call(tokens, dot, root, scope)
    if rest:
        raise ValueError(f"unparsed tokens {rest}")
    return value


def _operand(tokens, dot, root, scope):
    tok = tokens[0]
    if tok == "(":
        depth, close = 0, None
        for index, t in enumerate(tokens):
            depth += {"(": 1, ")": -1}.get(t, 0)
            if depth == 0:
                close = index
                break
        if close is None:
            raise ValueError(f"unbalanced parentheses in {tokens}")
        return _eval(tokens[1:close], dot, root, scope), tokens[close + 1 :]
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape"), tokens[1:]
    if re.fullmatch(r"-?\d+", tok):
        return int(tok), tokens[1:]
    if tok in ("true", "false"):
        return tok == "true", tokens[1:]
    if tok == ".":
        return dot, tokens[1:]
    if tok.startswith("$."):
        return root[tok[2:]], tokens[1:]
    if tok.startswith("$"):
        return scope.find(tok).vars[tok], tokens[1:]
    if tok.startswith("."):
        return dot[tok[1:]], tokens[1:]
    raise ValueError(f"unsupported operand {tok!r}")


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda x, i=0, j=None: x[i:j],
    "index": lambda x, i: x[i],
}


def _eval_call(tokens, dot, root, scope):
    if tokens and tokens[0] in _FUNCS or tokens and tokens[0] in ("and", "or"):
        name, rest, args = tokens[0], tokens[1:], []
        while rest:
            value, rest = _operand(rest, dot, root, scope)
            args.append(value)
        if name == "and":
            return next((a for a in args if not _truth(a)), args[-1]), []
        if name == "or":
            return next((a for a in args if _truth(a)), args[-1]), []
        return _FUNCS[name](*args), []
    return _operand(tokens, dot, root, scope)


def _run(nodes, dot, root, scope, out):
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "expr":
            tokens = node[1]
            if len(tokens) > 1 and tokens[1] in (":=", "="):
                value = _eval(tokens[2:], dot, root, scope)
                if tokens[1] == ":=":
                    scope.vars[tokens[0]] = value
                else:
                    scope.find(tokens[0]).vars[tokens[0]] = value
            else:
                value = _eval(tokens, dot, root, scope)
                out.append("" if value is None else str(value))
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, dot, root, scope)):
                    _run(body, dot, root, _Scope(scope), out)
                    break
            else:
                if node[2] is not None:
                    _run(node[2], dot, root, _Scope(scope), out)
        elif node[0] == "range":
            names, pipe, body = node[1], node[2], node[3]
            for i, item in enumerate(_eval(pipe, dot, root, scope)):
                inner = _Scope(scope)
                if len(names) == 2:
                    inner.vars[names[0]], inner.vars[names[1]] = i, item
                elif len(names) == 1:
                    inner.vars[names[0]] = item
                _run(body, item, root, inner, out)


def render(template: str, data: dict) -> str:
    out: list[str] = []
    _run(_parse(template), data, data, _Scope(), out)
    return "".join(out)
