"""Property: for random histories, as_of/diff equal a plain-Python replay of the changes in commit order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from bemi_tt.sources import InMemorySource
from bemi_tt.timetravel import as_of, diff, history

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
COLUMNS = [
    {"name": "id", "type": "integer", "type_oid": 23, "key": True},
    {"name": "name", "type": "text", "type_oid": 25, "key": False},
    {"name": "n", "type": "bigint", "type_oid": 20, "key": False},
]

# one step: (kind, key, other key, name, n); transactions group 1-3 steps
step = st.tuples(
    st.sampled_from(["write", "write", "write", "delete", "move", "truncate"]),
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from(["a", "b", "", "ü'\""]),
    st.none() | st.integers(-(2**40), 2**40),
)
transactions = st.lists(st.lists(step, min_size=1, max_size=3), min_size=1, max_size=12)


def _replay(
    txs: list[list[tuple[Any, ...]]],
) -> tuple[list[dict[str, Any]], list[tuple[datetime, dict[int, Any]]]]:
    """The changes a real table would produce, and the table's state after each commit."""
    state: dict[int, dict[str, Any]] = {}
    changes: list[dict[str, Any]] = []
    states = []
    for t, tx in enumerate(txs):
        cp, at = 100 * (t + 1), START + timedelta(seconds=t + 1)
        for o, (kind, key, other, name, n) in enumerate(tx):
            base = {
                "table": "item",
                "commit_position": cp,
                "ordinal": o,
                "committed_at": at,
                "context": {"tx": t},
            }
            if kind == "truncate":
                changes.append({**base, "operation": "TRUNCATE", "primary_key": None})
                state.clear()
            elif kind == "delete" and key in state:
                changes.append(
                    {**base, "operation": "DELETE", "primary_key": str(key), "before": state.pop(key)}
                )
            elif kind == "move" and key in state and other not in state:
                before = state.pop(key)
                state[other] = {**before, "id": other}
                changes.append(
                    {
                        **base,
                        "operation": "UPDATE",
                        "primary_key": str(other),
                        "before": before,
                        "after": state[other],
                    }
                )
            elif kind in ("write", "delete", "move"):
                row = {"id": key, "name": name, "n": n}
                operation = "UPDATE" if key in state else "CREATE"
                changes.append(
                    {
                        **base,
                        "operation": operation,
                        "primary_key": str(key),
                        "before": state.get(key, {}),
                        "after": row,
                    }
                )
                state[key] = row
        states.append(
            (START + timedelta(seconds=t + 1, milliseconds=500), {k: dict(v) for k, v in state.items()})
        )
    return changes, states


def _frame(state: dict[int, Any]) -> pd.DataFrame:
    keys = sorted(state)
    frame = pd.DataFrame(
        {
            "name": pd.array([state[k]["name"] for k in keys], dtype=pd.StringDtype()),
            "n": pd.array([state[k]["n"] for k in keys], dtype=pd.Int64Dtype()),
        }
    )
    frame.index = pd.Index(pd.array(keys, dtype="Int32"), name="id")
    return frame


@settings(max_examples=25, deadline=None)
@given(transactions)
def test_as_of_equals_a_python_replay_of_the_history(txs: list[list[tuple[Any, ...]]]) -> None:
    changes, states = _replay(txs)
    source = InMemorySource(
        changes, [{"table": "item", "commit_position": 0, "committed_at": START, "columns": COLUMNS}]
    )
    for when, state in states:
        pd.testing.assert_frame_equal(as_of("item", when, source=source), _frame(state))
    first, last = states[0][0], states[-1][0]
    assert diff("item", last, last, source=source).empty
    changed = diff("item", first, last, source=source)
    old, new = states[0][1], states[-1][1]
    expected_keys = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    assert set(changed.index.get_level_values("id")) == expected_keys


@settings(max_examples=25, deadline=None)
@given(transactions)
def test_history_lists_every_change_of_the_row_in_commit_order(txs: list[list[tuple[Any, ...]]]) -> None:
    changes, _ = _replay(txs)
    source = InMemorySource(
        changes, [{"table": "item", "commit_position": 0, "committed_at": START, "columns": COLUMNS}]
    )
    touched = [c for c in changes if c["primary_key"] == "1"]
    if not touched:
        return
    frame = history("item", 1, source=source)
    own = frame[frame["operation"] != "TRUNCATE"]
    positions = list(zip(own["commit_position"], own["ordinal"], strict=True))
    assert positions == sorted(positions)
    assert {(c["commit_position"], c["ordinal"]) for c in touched} <= set(positions)
