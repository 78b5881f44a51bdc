"""A synthetic instruction dataset with the length profile of real ones, shared by all benchmarks.

    from bench.instruction_data import make_dataset
    rows = make_dataset(10_000, flavour="prompt_completion", seed=42)
    rows[0]  # {"prompt": "...", "completion": " ..."}
    rows = make_dataset(10_000, flavour="messages", seed=42)
    rows[0]  # {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}

Lengths, in SmolLM2 tokens of the whole tokenized example (template and EOS included), follow
the profile of public instruction sets (e.g. Alpaca / UltraChat subsets): median about 94,
90th percentile about 220, a long tail to about 2,000. Drawn from a log-normal
(median 94, sigma 0.66 puts p90 at 220) plus a thin tail (0.3% of examples) spread
log-uniformly over 800..2,000 tokens, the longest exactly 2,000.

The text is made of common English words that are each exactly one SmolLM2 token (with or
without a leading space), in sentences ending with ".", so a content of k tokens is built
exactly; the chat-template overhead is a measured constant (below). `python bench/instruction_data.py`
prints the lengths as the SmolLM2 tokenizer actually sees them.

Deterministic: the same (n, flavour, seed) gives the same rows on every machine.
"""

from __future__ import annotations

import random

MEDIAN, SIGMA, MAX_TOKENS = 94, 0.66, 2000
TAIL_SHARE, TAIL_FROM = 0.003, 800
MIN_TOKENS = 12

# SmolLM2 chatml overheads, measured with its tokenizer (tokens besides the contents):
# user + assistant with the template's default system prompt: 32; with an own system
# message: 16 (plus the system text); each further user + assistant pair: 11.
OVERHEAD_DEFAULT_SYSTEM, OVERHEAD_OWN_SYSTEM, OVERHEAD_PER_PAIR = 32, 16, 11

# Each is one SmolLM2 token, alone or after a space (checked by `python bench/instruction_data.py`).
WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no will more can out up into do
time only other new some could these two may first then any like now my such over our man me even most
made after also did many before must well back through years where much your way down should because
each just those people how too little state good very make world still see own men work long here get
both between life being under never day same another know while last might us great old year off come
since against go came right used take three states few house use during without again place around
however home small found thought went say part once general high upon school every does got left number
course war until always away something fact though water less public put think almost hand enough far
head yet government system better set nothing night end why called find going look later point next
program city business give group young days let room president side social present given several order
national second possible rather per face among form important often things looking early white case
large big need four within felt along children best church ever least power development light thing
family interest want members mind country area others although done open problem door certain means
""".split()

FLAVOURS = ("prompt_completion", "messages")


def example_lengths(n: int, seed: int = 42) -> list[int]:
    """Target token count of each example (the whole tokenized example)."""
    rng = random.Random(seed)
    lengths = [
        min(MAX_TOKENS, max(MIN_TOKENS, round(rng.lognormvariate(_ln(MEDIAN), SIGMA)))) for _ in range(n)
    ]
    tail = max(1, round(TAIL_SHARE * n)) if n >= 100 else 0
    for i in rng.sample(range(n), tail):
        lengths[i] = round(TAIL_FROM * (MAX_TOKENS / TAIL_FROM) ** rng.random())
    if tail:
        lengths[rng.randrange(n)] = MAX_TOKENS
    return lengths


def make_dataset(n: int = 10_000, *, flavour: str = "prompt_completion", seed: int = 42) -> list[dict]:
    """`n` examples of the given flavour ("prompt_completion" or "messages"), deterministic in `seed`."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r} is not one of {FLAVOURS}")
    rng = random.Random(seed + 1)
    rows = []
    for total in example_lengths(n, seed):
        if flavour == "prompt_completion":
            rows.append(_prompt_completion(rng, total))
        else:
            rows.append(_messages(rng, total))
    return rows


def _prompt_completion(rng: random.Random, total: int) -> dict:
    # prompt + completion + the EOS the tokenizer appends; instructions are the shorter part
    content = total - 1
    prompt = max(3, round(content * rng.uniform(0.15, 0.6)))
    completion = max(2, content - prompt)
    return {"prompt": _text(rng, prompt), "completion": " " + _text(rng, completion)}


def _messages(rng: random.Random, total: int) -> dict:
    pairs = 1 if total < 200 or rng.random() < 0.6 else rng.randint(2, 4)
    own_system = rng.random() < 0.3
    overhead = (OVERHEAD_OWN_SYSTEM if own_system else OVERHEAD_DEFAULT_SYSTEM) + OVERHEAD_PER_PAIR * (
        pairs - 1
    )
    content = max(4 * pairs, total - overhead)
    messages = []
    if own_system:
        system = min(12, max(2, content // 10))
        messages.append({"role": "system", "content": _text(rng, system)})
        content -= system
    # each pair: a shorter question, a longer answer
    shares = [rng.uniform(0.5, 1.5) for _ in range(pairs)]
    budgets = [max(4, round(content * s / sum(shares))) for s in shares]
    for budget in budgets:
        question = max(2, round(budget * rng.uniform(0.15, 0.5)))
        messages.append({"role": "user", "content": _text(rng, question)})
        messages.append({"role": "assistant", "content": _text(rng, max(2, budget - question))})
    return {"messages": messages}


def long_conversations(n: int, tokens: int, *, seed: int = 42, pair_tokens: int = 512) -> list[dict]:
    """`n` multi-turn conversations ("messages") of exactly `tokens` SmolLM2 tokens each (template
    included): the template's default system prompt and user/assistant pairs of about
    `pair_tokens`, each answer three times its question."""
    rng = random.Random(seed)
    pairs = max(1, tokens // pair_tokens)
    content = tokens - OVERHEAD_DEFAULT_SYSTEM - OVERHEAD_PER_PAIR * (pairs - 1)
    if content < 4 * pairs:
        raise ValueError(f"long_conversations: {tokens} tokens is too short for {pairs} pairs")
    rows = []
    for _ in range(n):
        budgets = [content // pairs + (1 if i < content % pairs else 0) for i in range(pairs)]
        messages = []
        for budget in budgets:
            question = max(2, budget // 4)
            messages.append({"role": "user", "content": _text(rng, question)})
            messages.append({"role": "assistant", "content": _text(rng, budget - question)})
        rows.append({"messages": messages})
    return rows


def _text(rng: random.Random, tokens: int) -> str:
    """Sentences of one-token words, each ending with "." (one token too): exactly `tokens` tokens."""
    sentences, left = [], tokens
    while left > 0:
        words = min(left - 1, rng.randint(4, 16)) if left > 1 else 0
        sentence = " ".join(rng.choice(WORDS) for _ in range(words))
        sentences.append(sentence + "." if words else ".")
        left -= words + 1
    return " ".join(sentences)


def _ln(x: float) -> float:
    import math

    return math.log(x)


if __name__ == "__main__":
    # Check the profile on the SmolLM2 tokenizer: python bench/instruction_data.py
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import SMOLLM2_GGUF, smollm2_dir  # noqa: E402
    from transformers import AutoTokenizer  # noqa: E402

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    bad = [w for w in WORDS if len(tok(w).input_ids) != 1 or len(tok(" " + w).input_ids) != 1]
    print("words that are not one token:", bad)
    for flavour in FLAVOURS:
        rows = make_dataset(2000, flavour=flavour)
        if flavour == "prompt_completion":
            lengths = [len(tok(r["prompt"] + r["completion"]).input_ids) + 1 for r in rows]
        else:
            lengths = [
                len(tok(tok.apply_chat_template(r["messages"], tokenize=False)).input_ids) for r in rows
            ]
        targets = example_lengths(2000)
        q = statistics.quantiles(lengths, n=10)
        print(
            f"{flavour}: median {statistics.median(lengths)}, p90 {q[-1]:.0f}, max {max(lengths)}; "
            f"off target by {sum(abs(a - b) for a, b in zip(lengths, targets)) / len(rows):.2f} tokens on average"
        )
