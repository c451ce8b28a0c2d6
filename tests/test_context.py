"""The context API: validation, encoding once, scoping across threads and tasks (no database needed)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import enum
import json
import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bemi_tt.context import (
    Bemi,
    configure_context,
    context,
    context_settings,
    current_encoded,
    encode_context,
    get_context,
    set_context,
)
from capture.errors import ConfigurationError

_MARKER = re.compile(r"^/\*bemi:([A-Za-z0-9+/=]*)\*/")


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    settings = context_settings()
    set_context(None)
    yield
    set_context(None)
    configure_context(max_bytes=settings.max_bytes, max_sql_bytes=settings.max_sql_bytes)


def decoded(statement: str, value: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The JSON object inside the marker the hook would prepend, and the statement after it."""
    enc = encode_context(value)
    assert enc is not None
    marked = enc.marked(statement)
    match = _MARKER.match(marked)
    assert match, marked[:100]
    return json.loads(base64.b64decode(match.group(1), validate=True)), marked[match.end():]


class Color(enum.Enum):
    RED = "red"


def test_set_context_then_get_context_returns_a_copy_of_it() -> None:
    value = {"user_id": 187234, "endpoint": "/todo"}
    set_context(value)
    got = get_context()
    assert got == value
    got["user_id"] = 0
    assert get_context() == value


@pytest.mark.parametrize("cleared", [None, {}], ids=["none", "empty-dict"])
def test_set_context_none_or_empty_clears_it(cleared: dict[str, Any] | None) -> None:
    set_context({"a": 1})
    set_context(cleared)
    assert get_context() == {}
    assert current_encoded() is None


def test_bemi_set_context_is_the_same_as_set_context() -> None:
    Bemi.set_context({"user": "x"})
    assert get_context() == {"user": "x"} == Bemi.get_context()


@pytest.mark.parametrize("value", [[("a", 1)], "user=1", 42], ids=["list", "str", "int"])
def test_non_dict_context_raises_type_error_naming_the_type(value: Any) -> None:
    with pytest.raises(TypeError, match=type(value).__name__):
        set_context(value)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"blob": b"x"}, "key \\['blob'\\]"),
        ({"outer": {"inner": object()}}, "key \\['outer'\\]\\['inner'\\]"),
        ({"items": [1, 2, 1j]}, "key \\['items'\\]\\[2\\]"),
        ({"delta": dt.timedelta(seconds=1)}, "key \\['delta'\\]"),
    ],
    ids=["bytes", "nested-object", "complex-in-list", "timedelta"],
)
def test_non_json_value_raises_type_error_naming_the_key(value: dict[str, Any], named: str) -> None:
    with pytest.raises(TypeError, match=named):
        set_context(value)
    assert get_context() == {}


def test_non_string_key_raises_type_error() -> None:
    with pytest.raises(TypeError, match="JSON keys must be str"):
        set_context({1: "a"})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "value",
    [{"v": "a\x00b"}, {"k\x00": 1}, {"deep": ["ok", {"x": "\x00"}]}],
    ids=["value", "key", "nested"],
)
def test_nul_anywhere_is_rejected_because_postgresql_text_cannot_hold_it(value: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="NUL"):
        set_context(value)


@pytest.mark.parametrize("number", [float("nan"), float("inf"), Decimal("NaN"), Decimal("-Infinity")])
def test_non_finite_numbers_are_rejected(number: Any) -> None:
    with pytest.raises(ConfigurationError, match="JSON cannot hold"):
        set_context({"n": number})


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="surrogate"):
        set_context({"s": "\ud800"})


def _nested(levels: int) -> dict[str, Any]:
    """``{"a": {"a": ... {}}}``: ``levels`` dicts in all, the outer one included."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_a_10000_deep_context_is_a_configuration_error_naming_the_limit_and_the_key_path() -> None:
    pattern = r"nested 129 levels deep at key \['a'\]\['a'\].*limit of 128"
    with pytest.raises(ConfigurationError, match=pattern) as exc:
        set_context(_nested(10_000))
    assert str(exc.value).count("['a']") == 128
    assert current_encoded() is None


def test_a_context_at_the_depth_limit_is_accepted_and_one_level_more_is_not() -> None:
    set_context(_nested(128))
    set_context({"list": [[[]]], **_nested(125)})
    with pytest.raises(ConfigurationError, match="nested 129 levels"):
        set_context({"list": [_nested(127)]})


def test_a_context_that_contains_itself_is_a_configuration_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ConfigurationError, match="contains itself"):
        set_context({"loop": loop})


@pytest.mark.parametrize(
    "number",
    [Decimal("1E+131072"), Decimal("-1E-16384"), Decimal("0E-16384"), 10**131072],
    ids=["too-large", "too-small", "zero-scale-too-long", "huge-int"],
)
def test_numbers_outside_postgresql_numeric_are_rejected_at_set_time(number: Any) -> None:
    with pytest.raises(ConfigurationError, match="key \\['n'\\]"):
        set_context({"n": number})


def test_numbers_at_numeric_limits_keep_their_exact_digits() -> None:
    enc = encode_context(
        {"big": Decimal("9.9E+131071"), "small": Decimal("1E-16383"), "money": Decimal("10.10")}
    )
    assert enc is not None
    assert enc.json == '{"big":9.9E+131071,"small":1E-16383,"money":10.10}'


def test_sql_key_is_reserved_for_the_statement_text() -> None:
    with pytest.raises(ConfigurationError, match="'SQL' is reserved"):
        set_context({"SQL": "mine"})


def test_common_python_types_serialize_naturally() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)
    ident = uuid.uuid4()
    value = {
        "when": when, "day": when.date(), "at": when.time(), "id": ident, "price": Decimal("10.10"),
        "color": Color.RED, "pair": (1, "a"), "tags": {"b", "a", "c"},
    }
    got, _ = decoded("INSERT INTO t VALUES (1)", value)
    assert got["when"] == when.isoformat() and got["day"] == when.date().isoformat()
    assert got["at"] == when.time().isoformat() and got["id"] == str(ident)
    assert got["color"] == Color.RED.value and got["pair"] == [1, "a"]
    assert got["tags"] == sorted(value["tags"])
    enc = encode_context(value)
    assert enc is not None and '"price":10.10' in enc.json  # exact: not 10.1 or "10.10"


def test_context_over_the_size_limit_is_rejected_at_set_time() -> None:
    configure_context(max_bytes=1000)
    set_context({"v": "x" * 900})
    with pytest.raises(ConfigurationError, match="over the limit of 1000"):
        set_context({"v": "x" * 1000})
    assert get_context() == {"v": "x" * 900}


def test_default_limit_accepts_900_kb_and_rejects_2_mb() -> None:
    set_context({"v": "y" * 900_000})
    with pytest.raises(ConfigurationError, match="max_bytes"):
        set_context({"v": "y" * 2_000_000})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_configure_context_rejects_bad_limits(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="positive integer"):
        configure_context(max_bytes=bad)


def test_sql_text_is_capped_with_a_truncation_marker() -> None:
    configure_context(max_sql_bytes=64)
    statement = "INSERT INTO t (a) VALUES " + ", ".join(["(%s)"] * 500)
    got, rest = decoded(statement, {"u": 1})
    assert rest == statement
    assert got["SQL"].startswith(statement[:64]) and "truncated" in got["SQL"]
    assert len(got["SQL"]) < len(statement)


json_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)


@given(
    value=st.dictionaries(
        json_text.filter(lambda k: k not in ("SQL", "_bemi_sig")), json_values, min_size=1, max_size=6
    ),
    statement=json_text,
)
def test_marker_round_trips_any_json_context_and_never_touches_the_statement(
    value: dict[str, Any], statement: str
) -> None:
    got, rest = decoded(statement, value)
    assert rest == statement
    assert got.pop("SQL") == statement
    assert got == value


def test_context_manager_restores_previous_context_even_on_error() -> None:
    set_context({"user": "outer"})
    with pytest.raises(RuntimeError), context(job="import"):
        assert get_context() == {"user": "outer", "job": "import"}
        raise RuntimeError("boom")
    assert get_context() == {"user": "outer"}


def test_context_manager_nests_and_merges() -> None:
    with context(user=1) as first:
        assert first == {"user": 1}
        with context({"user": 2}, step="b"):
            assert get_context() == {"user": 2, "step": "b"}
        assert get_context() == {"user": 1}
    assert get_context() == {}


def test_context_validates_when_created_not_at_the_first_write() -> None:
    with pytest.raises(TypeError, match="'bad'"):
        context(bad=object())


def test_context_decorator_scopes_each_call_of_a_job() -> None:
    @context(worker="nightly")
    def job(n: int) -> dict[str, Any]:
        return {**get_context(), "n": n}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(20)))
    assert results == [{"worker": "nightly", "n": n} for n in range(20)]
    assert get_context() == {}


def test_context_decorator_on_coroutine_function() -> None:
    @context(worker="async-job")
    async def job() -> dict[str, Any]:
        await asyncio.sleep(0)
        return get_context()

    assert asyncio.run(job()) == {"worker": "async-job"}
    assert get_context() == {}


def test_threads_do_not_see_each_others_context() -> None:
    seen: dict[int, dict[str, Any]] = {}
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        set_context({"user": i})
        barrier.wait()
        seen[i] = get_context()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {i: {"user": i} for i in range(8)}
    assert get_context() == {}


def test_asyncio_tasks_do_not_see_each_others_context() -> None:
    async def request(i: int) -> dict[str, Any]:
        set_context({"user": i})
        await asyncio.sleep(0.001 * (i % 3))
        return get_context()

    async def main() -> list[dict[str, Any]]:
        return await asyncio.gather(*(request(i) for i in range(30)))

    assert asyncio.run(main()) == [{"user": i} for i in range(30)]
    assert get_context() == {}
