"""The report of a preprocessing run: what was read, kept, dropped (and why), tokens per role and
part (trained / all), what the template did not render, the length histogram, and the rule that a run with too much bad input, or nothing kept, writes nothing."""
from __future__ import annotations

from dataclasses import dataclass, field

from megasft.data.indexed import DatasetError


@dataclass
class Summary:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped: dict = field(default_factory=dict)
    """reason -> count: policy drops and, with skip_bad, bad lines."""
    bad: dict = field(default_factory=dict)
    """reason -> count of the bad lines alone (a subset of ``dropped``)."""
    bad_examples: list = field(default_factory=list)
    """First few skipped bad lines as 'file:line: reason: detail'."""
    histogram: dict = field(default_factory=dict)
    """Kept-document length bucket upper bound -> count."""
    parts: dict = field(default_factory=dict)
    """"role/part" (e.g. "assistant/content", "user/other", "template/other") -> [tokens, trained tokens] of
    the kept documents (megasft.data.chat.parts)."""
    not_rendered: dict = field(default_factory=dict)
    """Fields the template did not render, skipped and counted (e.g. reasoning Qwen3 drops from history)."""
    seconds: float = 0.0
    files_tokenized: int = 0
    files_cached: int = 0
    """Input files tokenised by this run / taken from the cache."""

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / max(1, self.tokens)

    def add(self, other: "Summary") -> None:
        """Fold one file's summary into the run's (counts add up; the first bad examples are kept)."""
        for name in ("read", "kept", "truncated", "tokens", "trained_tokens", "files_tokenized", "files_cached"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.dropped, other.dropped), (self.bad, other.bad),
                             (self.not_rendered, other.not_rendered)):
            for reason, n in theirs.items():
                mine[reason] = mine.get(reason, 0) + n
        for name, (tokens, trained) in other.parts.items():
            have = self.parts.get(name, [0, 0])
            self.parts[name] = [have[0] + tokens, have[1] + trained]
        self.bad_examples += other.bad_examples[:10 - len(self.bad_examples)]
        for bucket, n in other.histogram.items():
            self.histogram[int(bucket)] = self.histogram.get(int(bucket), 0) + n
        self.histogram = dict(sorted(self.histogram.items()))

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "histogram": {int(k): v for k, v in fields.get("histogram", {}).items()}})


def check_kept(s: Summary, opts) -> None:
    """DatasetError for a run whose output must not replace anything: more bad lines than
    ``max_bad_fraction`` of those read (the wrong file, or a format misread, skipped line by
    line), or no document kept at all."""
    n_bad = sum(s.bad.values())
    if opts.skip_bad and n_bad > opts.max_bad_fraction * s.read:
        raise DatasetError(f"{n_bad} of {s.read} lines are bad ({n_bad / max(1, s.read):.1%} > --max-bad-fraction "
                           f"{opts.max_bad_fraction:g}; {_counts(s.bad)}), first {s.bad_examples[0]}; fix the input "
                           "or raise --max-bad-fraction")
    if s.kept == 0:
        dropped = f" ({_counts(s.dropped)})" if s.dropped else ""
        raise DatasetError(f"no conversation kept of {s.read} read{dropped}: the dataset would be empty; "
                           "check the input, --format, --mask-mode and --seq-len")


def histogram_bucket(n: int) -> int:
    return 1 << max(6, (n - 1).bit_length())  # powers of two from 64


def _counts(counts: dict) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


def format_summary(s: Summary) -> str:
    """The human-readable report printed by the CLI."""
    lines = [
        f"conversations read   {s.read:>12,}",
        f"kept                 {s.kept:>12,}",
        f"dropped              {sum(s.dropped.values()):>12,}",
        *[f"  {reason:<34}{n:>8,}" for reason, n in sorted(s.dropped.items())],
        f"truncated            {s.truncated:>12,}",
        f"tokens               {s.tokens:>12,}",
        f"trained tokens       {s.trained_tokens:>12,}",
        f"trained fraction     {s.trained_fraction:>12.3f}",
        f"throughput           {s.tokens / max(s.seconds, 1e-9):>12,.0f} tokens/s",
    ]
    if s.files_cached:
        lines.append(f"input files          {s.files_tokenized:>12,} tokenised, {s.files_cached:,} from the cache")
    if s.not_rendered:
        lines += ["not rendered by the template (skipped, counted):",
                  *[f"  {note:<34}{n:>8,}" for note, n in sorted(s.not_rendered.items())]]
    if s.parts:
        lines += ["tokens per role/part (trained / all):", *format_parts(s.parts)]
    if s.bad_examples:
        lines += ["skipped lines (first %d):" % len(s.bad_examples), *[f"  {m}" for m in s.bad_examples]]
    if s.histogram:
        lines.append("document length histogram (tokens <= bucket):")
        peak = max(s.histogram.values())
        for bucket, n in s.histogram.items():
            lines.append(f"  {bucket:>7}  {n:>9,}  {'#' * max(1, round(40 * n / peak))}")
    return "\n".join(lines)


def format_parts(table: dict) -> list[str]:
    """Rows of a {"role/part": [tokens, trained]} table (Summary.parts, the audit)."""
    return [f"  {name:<28}{trained:>12,} / {tokens:<12,} ({trained / max(1, tokens):6.1%})"
            for name, (tokens, trained) in table.items()]
