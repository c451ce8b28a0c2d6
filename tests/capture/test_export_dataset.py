"""The dataset's self-description: file names, which files readers use, the watermark (pure, on names)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.errors import SourceError
from capture.export.dataset import read_dataset_state, resolve_directory
from capture.export.layout import compacted_name, format_key, partition_dir, unit_name

PARTITIONS = [
    partition_dir("public", name, "2026-01-0" + str(day)) for name in ("a", "b c") for day in (1, 2)
]


@given(
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
)
def test_formatted_keys_sort_like_the_keys(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert (format_key(a) < format_key(b)) == (a < b)
    assert len(format_key(a)) == 24


def test_a_negative_key_is_rejected() -> None:
    with pytest.raises(SourceError, match=r"change key \(-1, 0\) is out of range"):
        format_key((-1, 0))


def test_partition_directories_percent_encode_unsafe_characters() -> None:
    assert partition_dir("public", "todo", "2026-01-02") == "relation=public.todo/date=2026-01-02"
    assert (
        partition_dir("s", "a/b=c%d é", "2026-01-02") == "relation=s.a%2Fb%3Dc%25d%20%C3%A9/date=2026-01-02"
    )


class _Model:
    """A dataset written by a sequence of exports and compactions; remembers each file's keys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.keys: dict[Path, list[tuple[int, int]]] = {}
        self.ranges: dict[Path, tuple[tuple[int, int], tuple[int, int]]] = {}
        self.live: dict[str, list[Path]] = {p: [] for p in PARTITIONS}
        self.complete: list[tuple[int, int]] = []
        self.next = 1

    def _write(
        self, partition: str, name: str, keys: list[tuple[int, int]], first: tuple, last: tuple
    ) -> Path:
        path = self.root / partition / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        self.keys[path], self.ranges[path] = keys, (first, last)
        return path

    def unit(self, partitions: list[int], keep: list[bool] | None) -> None:
        """One export unit with a change per entry of ``partitions``; ``keep`` drops parts (a crash)."""
        keys = [(self.next + i, i % 3) for i in range(len(partitions))]
        self.next += len(partitions) + 1
        groups: dict[str, list[tuple[int, int]]] = {}
        for key, index in zip(keys, partitions, strict=True):
            groups.setdefault(PARTITIONS[index], []).append(key)
        written = []
        for number, partition in enumerate(sorted(groups), 1):
            if keep is not None and not keep[(number - 1) % len(keep)]:
                continue
            name = unit_name(keys[0], keys[-1], number, len(groups), len(groups[partition]))
            written.append((partition, self._write(partition, name, groups[partition], keys[0], keys[-1])))
        if len(written) == len(groups):  # compaction only ever merges files of complete units
            self.complete.extend(keys)
            for partition, path in written:
                self.live[partition].append(path)

    def compact(self, partition_index: int, start: int, length: int, leave_replaced: bool) -> None:
        files = self.live[PARTITIONS[partition_index]]
        run = files[start : start + length]
        if len(run) < 2:
            return
        keys = [k for path in run for k in self.keys[path]]
        first, last = self.ranges[run[0]][0], self.ranges[run[-1]][1]  # the ranges the names record
        name = compacted_name(first, last, len(keys))
        merged = self._write(PARTITIONS[partition_index], name, keys, first, last)
        files[start : start + length] = [merged]
        if not leave_replaced:
            for path in run:
                path.unlink()


steps = st.lists(
    st.tuples(
        st.lists(st.integers(0, len(PARTITIONS) - 1), min_size=1, max_size=6),
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(2, 4), st.booleans()), max_size=2
        ),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(
    steps=steps,
    crash=st.none() | st.lists(st.booleans(), min_size=1, max_size=4),
    after_crash=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(2, 4), st.booleans()), max_size=2
    ),
)
def test_readers_get_every_change_of_complete_units_once_whatever_exports_and_compactions_left(
    steps: list[tuple[list[int], list[tuple[int, int, int, bool]]]],
    crash: list[bool] | None,
    after_crash: list[tuple[int, int, int, bool]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        model = _Model(Path(directory))
        for partitions, compactions in steps:
            model.unit(partitions, None)
            for index, start, length, leave in compactions:
                model.compact(index, start, length, leave)
        if crash is not None:
            model.unit([0, 1, 2, 3, 1], crash)
            for index, start, length, leave in after_crash:  # a compaction before the export reruns
                model.compact(index, start, length, leave)
        state = read_dataset_state(*resolve_directory(directory))
        read = [key for f in state.files for key in model.keys[Path(f.path)]]
        assert sorted(read) == sorted(model.complete)  # no duplicate, no gap
        assert state.watermark == max(model.complete)
        assert sum(f.rows for f in state.files) == len(model.complete)
        if crash is not None and any(crash) and not all(crash):
            assert state.incomplete is not None
        assert {Path(f.path) for f in state.superseded}.isdisjoint(Path(f.path) for f in state.files)


def test_two_incomplete_units_are_reported_as_a_dataset_written_without_a_lock(tmp_path: Path) -> None:
    for first, last in (((1, 0), (2, 0)), ((3, 0), (4, 0))):
        path = tmp_path / PARTITIONS[0] / unit_name(first, last, 1, 2, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    with pytest.raises(SourceError, match=r"incomplete export units .* that are not the newest"):
        read_dataset_state(*resolve_directory(str(tmp_path)))


def test_files_that_are_not_data_files_are_ignored_by_readers_and_reported_as_foreign(tmp_path: Path) -> None:
    (tmp_path / "_bemi_tt").mkdir()
    for name in ("schemas.parquet", "schemas.pq", "dataset.json", "lock"):
        (tmp_path / "_bemi_tt" / name).write_bytes(b"")
    (tmp_path / "_bemi_tt" / ".schemas.pq.0123.tmp").write_bytes(b"")
    (tmp_path / PARTITIONS[0]).mkdir(parents=True)
    (tmp_path / PARTITIONS[0] / "notes.parquet").write_bytes(b"")
    (tmp_path / "README").write_bytes(b"")
    state = read_dataset_state(*resolve_directory(str(tmp_path)))
    assert (state.files, state.watermark) == ([], None)
    assert state.temporary == [str(tmp_path / "_bemi_tt" / ".schemas.pq.0123.tmp")]
    assert sorted(state.foreign) == sorted(
        [str(tmp_path / PARTITIONS[0] / "notes.parquet"), str(tmp_path / "README")]
    )
