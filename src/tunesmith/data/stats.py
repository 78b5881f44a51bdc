"""What `prepare_dataset` made: `PreparedDataset` (the rows and their `DataStats`), and the length
summary (histogram, percentiles) the stats carry.

    >>> import numpy as np
    >>> length_summary(np.array([10, 40, 70]))
    ({'edges': [32, 64, 70], 'counts': [1, 1, 1]}, {'p50': 40, 'p90': 64, 'max': 70})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

# Upper edges of the length histogram buckets (the last bucket is open-ended).
HISTOGRAM_EDGES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class DataStats:
    """What prepare_dataset did to the data. Token counts are after truncation unless named otherwise."""

    source: str = ""
    format: str = ""
    examples_in: int | None = None  # rows read from the source (None until a stream is read)
    examples_out: int | None = None  # examples that made it into the training rows
    truncated: int = 0  # examples cut to max_length
    tokens_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> examples removed
    tokens_dropped: int = 0
    split_documents: int = 0  # documents spread over several rows (bfd_split, wrapped)
    tokens: int = 0  # tokens in the training rows
    supervised_tokens: int = 0  # of which trained (labels != -100)
    rows: int = 0
    max_length: int | None = None
    packing_strategy: str | None = None  # None when not packed
    packing_efficiency: float | None = None  # tokens / (rows * max_length), packed data only
    # tokenized lengths before truncation: counts[i] examples with edges[i-1] <= length < edges[i]
    # (edges[-1] is the longest length, inclusive); e.g. {"edges": [32, 64, 70], "counts": [1, 2, 1]}
    length_histogram: dict = field(default_factory=dict)
    length_percentiles: dict = field(default_factory=dict)  # {"p50", "p90", "max"} of tokenized lengths
    cache_hit: bool = False
    cache_path: str | None = None
    seconds: float = 0.0
    streaming: bool = False
    read_notes: list = field(
        default_factory=list
    )  # how the file was read: a byte-order mark, CRLF (sources.file_notes)

    def summary(self) -> str:
        """A few lines for the log and the CLI."""
        lines = [f"data: {self.source} ({self.format})" + (", streaming" if self.streaming else "")]
        if self.cache_hit:
            lines.append(f"  reused from cache {self.cache_path}")
        lines += [f"  read: {note}" for note in self.read_notes]
        counted = " so far" if self.streaming else ""
        lines.append(f"  examples: {self.examples_in} in, {self.examples_out} out{counted}")
        if self.truncated:
            lines.append(
                f"  truncated: {self.truncated} examples to {self.max_length} tokens ({self.tokens_truncated} tokens lost)"
            )
        for reason, count in self.dropped.items():
            if count:
                lines.append(f"  dropped: {count} examples ({reason.replace('_', ' ')})")
        if self.split_documents:
            lines.append(f"  split across rows: {self.split_documents} documents")
        share = f" ({100 * self.supervised_tokens / self.tokens:.1f}%)" if self.tokens else ""
        lines.append(f"  tokens: {self.tokens}, of which trained: {self.supervised_tokens}{share}")
        if self.packing_strategy:
            lines.append(
                f"  packed ({self.packing_strategy}) into {self.rows} rows of {self.max_length}: "
                f"efficiency {100 * (self.packing_efficiency or 0):.1f}%"
            )
        else:
            lines.append(f"  rows: {self.rows} (not packed)")
        if self.length_percentiles:
            p = self.length_percentiles
            lines.append(f"  example length: median {p['p50']}, p90 {p['p90']}, max {p['max']} tokens")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class PreparedDataset:
    dataset: object  # datasets.Dataset, or datasets.IterableDataset when streaming
    stats: DataStats


def length_summary(lengths: np.ndarray) -> tuple[dict, dict]:
    if len(lengths) == 0:
        return {}, {}
    edges = [e for e in HISTOGRAM_EDGES if e < lengths.max()] + [int(lengths.max())]
    counts = np.histogram(lengths, bins=[0, *edges[:-1], edges[-1] + 1])[0]
    percentiles = {
        "p50": int(np.percentile(lengths, 50)),
        "p90": int(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }
    return {"edges": [int(e) for e in edges], "counts": counts.tolist()}, percentiles
