"""``SegmentedTable``: an append-only parquet table kept as segment files in one folder,
merged in levels, so that a flush costs the same however long the run, and crash-safe.

See docs/training.md (Run folder, "Why segments").
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import warnings
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from metalearn.training.checkpoint import atomic_write_bytes

_NAME = re.compile(r"^L(\d+)-(\d{9})-(\d{9})\.parquet$")


class SegmentWarning(UserWarning):
    """A segment file could not be read and was skipped."""


@dataclasses.dataclass(frozen=True, order=True)
class Segment:
    first: int  # first append number it holds
    last: int  # last append number it holds
    level: int
    path: str = dataclasses.field(compare=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def covers(self, other: "Segment") -> bool:
        return (self is not other and self.level > other.level
                and self.first <= other.first and other.last <= self.last)


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    """Rows (dicts) as one table whose columns are the union of the rows' keys."""
    columns = dict.fromkeys(key for row in rows for key in row)
    return pa.table({c: [r.get(c) for r in rows] for c in columns})


def concat(tables: Iterable[pa.Table]) -> pa.Table:
    """Tables with different columns (or null vs typed, int vs float) as one."""
    tables = [t for t in tables if t.num_columns]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


class SegmentedTable:
    """The append-only table in ``folder`` (created on the first append).

    Rows are dicts of scalars with an integer ``step`` column; columns may differ between
    segments (a column missing from a row is null). ``read`` unifies the schemas, which a
    bare ``pyarrow.parquet.read_table(folder)`` does not (it takes the first file's)."""

    def __init__(self, folder: str, *, fanout: int = 16, max_level: int = 3):
        if fanout < 2 or max_level < 0:
            raise ValueError(f"fanout {fanout} must be >= 2 and max_level {max_level} >= 0")
        self.folder = os.path.abspath(folder)
        self.fanout, self.max_level = fanout, max_level
        self._next: int | None = None  # next append number (from the folder's names)

    # ------------------------------------------------------------------ listing

    def _all_segments(self) -> list[Segment]:
        if not os.path.isdir(self.folder):
            return []
        found = []
        for name in os.listdir(self.folder):
            match = _NAME.match(name)
            if match:
                level, first, last = (int(g) for g in match.groups())
                found.append(Segment(first, last, level, os.path.join(self.folder, name)))
        return sorted(found)

    def segments(self) -> list[Segment]:
        """The live segments in append order (those covered by a merge are left out)."""
        every = self._all_segments()
        return [s for s in every if not any(o.covers(s) for o in every)]

    def next_append(self) -> int:
        if self._next is None:
            self._next = max((s.last for s in self._all_segments()), default=-1) + 1
        return self._next

    # ------------------------------------------------------------------ reading

    def read_segment(self, segment: Segment) -> pa.Table | None:
        """The segment's rows, or None (with a ``SegmentWarning``) if it is unreadable."""
        try:
            return pq.read_table(segment.path)
        except (OSError, pa.ArrowException) as err:
            warnings.warn(f"metrics segment {segment.path} is unreadable "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                          f"its rows are skipped", SegmentWarning, stacklevel=3)
            return None

    def read(self) -> pa.Table:
        """Every readable row, in append order, as one table (columns unified)."""
        return concat(t for t in map(self.read_segment, self.segments()) if t is not None)

    # ------------------------------------------------------------------ writing

    def append(self, rows: Sequence[dict]) -> Segment | None:
        """Write ``rows`` as one new segment (then merge full levels); None if no rows."""
        if not rows:
            return None
        os.makedirs(self.folder, exist_ok=True)
        number = self.next_append()
        segment = self._write(rows_to_table(rows), 0, number, number)
        self._next = number + 1
        self._merge_full_levels()
        return segment

    def _write(self, table: pa.Table, level: int, first: int, last: int) -> Segment:
        path = os.path.join(self.folder, f"L{level}-{first:09d}-{last:09d}.parquet")
        atomic_write_bytes(path, table_bytes(table))
        return Segment(first, last, level, path)

    def _merge_full_levels(self) -> None:
        self._delete_covered()  # any left by a crash between a merge and its deletes
        for level in range(self.max_level):
            same = [s for s in self.segments() if s.level == level]
            if len(same) < self.fanout:
                return
            self._merge(same, level + 1)

    def _merge(self, inputs: list[Segment], level: int) -> None:
        tables = [t for t in map(self.read_segment, inputs) if t is not None]
        self._write(concat(tables), level, inputs[0].first, inputs[-1].last)
        self._delete_covered()

    def _delete_covered(self) -> None:
        every = self._all_segments()
        for segment in every:
            if any(o.covers(segment) for o in every):
                os.unlink(segment.path)

    def rewrite(self, keep) -> list[dict]:
        """Drop the rows for which ``keep(row)`` is false; returns them (rare: resumes,
        learner restarts). Each affected segment is replaced by one holding the rows it
        keeps (same name: an atomic rename), or deleted if it keeps none."""
        dropped: list[dict] = []
        for segment in self.segments():
            table = self.read_segment(segment)
            if table is None:
                continue
            rows = table.to_pylist()
            kept = [r for r in rows if keep(r)]
            if len(kept) == len(rows):
                continue
            dropped.extend(r for r in rows if not keep(r))
            if kept:
                atomic_write_bytes(segment.path, table_bytes(
                    rows_to_table([{k: v for k, v in r.items() if v is not None}
                                   for r in kept])))
            else:
                os.unlink(segment.path)
        return dropped

    def quarantine_unreadable(self, into: str) -> list[str]:
        """Move unreadable segments into ``into`` (out of the table); their names."""
        moved = []
        for segment in self.segments():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SegmentWarning)
                if self.read_segment(segment) is not None:
                    continue
            os.makedirs(into, exist_ok=True)
            os.replace(segment.path, os.path.join(into, segment.name))
            moved.append(segment.name)
        return moved


__all__ = ["Segment", "SegmentWarning", "SegmentedTable", "concat", "rows_to_table", "table_bytes"]
