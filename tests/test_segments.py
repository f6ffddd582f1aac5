"""The append-only segmented table: appends, merges, crash leftovers, torn files."""

import os
import warnings

import pytest

from metalearn.training.segments import SegmentedTable, SegmentWarning


def _rows(first, last, **extra):
    return [{"step": s, "loss": 1.0 / s, **extra} for s in range(first, last + 1)]


def test_appends_read_back_as_one_table_with_unified_columns(tmp_path):
    table = SegmentedTable(str(tmp_path / "t"))
    table.append(_rows(1, 3))
    table.append(_rows(4, 4, **{"eval/acc": 0.5}))  # a column the first segment lacks
    table.append([{"step": 5, "loss": 2}])  # an int where earlier rows have floats
    assert table.append([]) is None
    rows = table.read().to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("eval/acc") for r in rows] == [None, None, None, 0.5, None]
    assert rows[4]["loss"] == 2.0
    assert len(table.segments()) == 3


def test_merges_bound_the_segment_count_and_keep_every_row(tmp_path):
    table = SegmentedTable(str(tmp_path / "t"), fanout=4, max_level=2)
    for step in range(1, 101):
        table.append(_rows(step, step))
    steps = table.read().column("step").to_pylist()
    assert steps == list(range(1, 101))
    levels = [s.level for s in table.segments()]
    # 100 appends with fanout 4, max level 2: six level-2 segments (16 appends each),
    # one level-1 (4), no level-0; levels never increase in append order.
    assert levels == [2] * 6 + [1]
    assert levels == sorted(levels, reverse=True)
    assert len(os.listdir(table.folder)) == 7  # merged inputs were deleted


def test_a_crash_between_merge_and_delete_leaves_no_duplicate(tmp_path):
    table = SegmentedTable(str(tmp_path / "t"), fanout=4, max_level=1)
    for step in range(1, 4):
        table.append(_rows(step, step))
    inputs = table.segments()
    saved = {s.path: open(s.path, "rb").read() for s in inputs}
    table.append(_rows(4, 4))  # merges appends 0..3 into one level-1 segment
    for path, data in saved.items():  # as if the process died before deleting them
        with open(path, "wb") as f:
            f.write(data)
    assert table.read().column("step").to_pylist() == [1, 2, 3, 4]
    table.append(_rows(5, 5))
    assert len(os.listdir(table.folder)) == 2  # the next append cleaned them up


def test_a_torn_segment_is_skipped_with_a_warning_and_can_be_moved_aside(tmp_path):
    table = SegmentedTable(str(tmp_path / "t"))
    table.append(_rows(1, 2))
    torn = table.append(_rows(3, 4))
    data = open(torn.path, "rb").read()
    with open(torn.path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.warns(SegmentWarning, match=torn.name):
        assert table.read().column("step").to_pylist() == [1, 2]
    assert table.quarantine_unreadable(str(tmp_path / "bad")) == [torn.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table.append(_rows(5, 5))
        assert table.read().column("step").to_pylist() == [1, 2, 5]
    # A temporary file of an interrupted write is not a segment.
    (tmp_path / "t" / ".tmp-L0-000000009-000000009.parquet").write_bytes(b"PAR1")
    assert len(table.segments()) == 2


def test_rewrite_drops_rows_and_returns_them(tmp_path):
    table = SegmentedTable(str(tmp_path / "t"))
    table.append(_rows(1, 3))
    table.append(_rows(4, 6))
    table.append(_rows(7, 8))
    dropped = table.rewrite(lambda r: r["step"] <= 5)
    assert [r["step"] for r in dropped] == [6, 7, 8]
    assert table.read().column("step").to_pylist() == [1, 2, 3, 4, 5]
    table.append(_rows(6, 6))  # appends go on after a rewrite
    assert table.read().column("step").to_pylist() == [1, 2, 3, 4, 5, 6]
