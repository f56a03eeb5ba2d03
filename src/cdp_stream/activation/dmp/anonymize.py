"""k-anonymity: exact counts of an audience (:class:`Tally`) and the cells of them that may
be published: nothing under k, and no residual a reader could subtract down under k
(docs/dmp.md, steps 1 and 2). Pure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cdp_stream.activation.dmp.dimensions import DIMENSIONS
from cdp_stream.activation.dmp.facts import Facts

OVERALL, ALL = "overall", "all"  # the cell of the audience's whole count


@dataclass
class Tally:
    """Exact counts of one audience at one moment: what anonymization starts from."""

    overall: int = 0
    buckets: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, facts: Facts, dimensions: Iterable[str]) -> None:
        """Count one consenting profile in ``overall`` and in one bucket per dimension."""
        self.overall += 1
        for name in dimensions:
            extract, vocabulary = DIMENSIONS[name]
            bucket = extract(facts)
            if bucket not in vocabulary:  # a bug in an extractor must not become a leak
                raise AssertionError(f"{name}: {bucket!r} is not in its vocabulary")
            self.buckets.setdefault(name, Counter())[bucket] += 1


Cell = tuple[str, str]  # (dimension, bucket)


def anonymize(tally: Tally, k: int) -> dict[Cell, int]:
    """The cells that may be published, with their exact counts (steps 1 and 2 of the
    docs/dmp.md): nothing under k, and per dimension a residual (overall minus its
    published buckets) that is 0 or at least k."""
    if tally.overall < k:
        return {}
    out: dict[Cell, int] = {(OVERALL, ALL): tally.overall}
    for name, counts in tally.buckets.items():
        shown = {bucket: n for bucket, n in counts.items() if n >= k}
        residual = tally.overall - sum(shown.values())
        while 0 < residual < k and shown:
            smallest = min(shown, key=lambda b: (shown[b], b))
            residual += shown.pop(smallest)
        out.update(((name, bucket), n) for bucket, n in shown.items())
    return out


def suppressed(tallied: Tally, published: Mapping[Cell, int]) -> int:
    """How many of the tally's non-empty cells (the overall one too) anonymization held
    back."""
    cells = [(OVERALL, ALL)] if tallied.overall else []
    cells += [(d, b) for d, counts in tallied.buckets.items() for b, n in counts.items() if n]
    return sum(cell not in published for cell in cells)
