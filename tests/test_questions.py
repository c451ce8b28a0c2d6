"""Questions that cannot match say so: unknown context keys, keys of the wrong shape, times in every form.

Each runs on every source kind (memory, PostgreSQL, Parquet); each failed on the code before (an empty
frame, or a rejected numpy time).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest
from timetravel_history import History
from timetravel_sources import Make

from bemi_tt.timetravel import as_of, audit, blame, diff, history
from capture.errors import ConfigurationError

ITEM_COLUMNS = [
    {"name": "order_id", "type": "integer", "type_oid": 23, "key": True},
    {"name": "line", "type": "integer", "type_oid": 23, "key": True},
    {"name": "sku", "type": "text", "type_oid": 25, "key": False},
    {"name": "qty", "type": "integer", "type_oid": 23, "key": False},
]
CUSTOMER_COLUMNS = [
    {"name": "id", "type": "integer", "type_oid": 23, "key": True},
    {"name": "name", "type": "text", "type_oid": 25, "key": False},
    {"name": "limit", "type": "numeric(10,2)", "type_oid": 1700, "key": False},
]
CODE_COLUMNS = [
    {"name": "code", "type": "text", "type_oid": 25, "key": True},
    {"name": "label", "type": "text", "type_oid": 25, "key": False},
]
LOG_COLUMNS = [
    {"name": "message", "type": "text", "type_oid": 25, "key": False},
]


def _shop(h: History) -> dict[str, datetime]:
    """order_items with a composite key, customers with an integer key, codes with a text key, a log
    without a primary key; contexts carry user_id and endpoint."""
    times: dict[str, datetime] = {}
    h.columns("order_items", ITEM_COLUMNS)
    h.columns("customers", CUSTOMER_COLUMNS)
    h.columns("codes", CODE_COLUMNS)
    h.columns("log", LOG_COLUMNS)
    item = {"order_id": 7, "line": 1, "sku": "A-1", "qty": 2}
    times["item"] = h.create("order_items", "[7,1]", item, {"user_id": 11, "endpoint": "/orders"})
    h.create("order_items", "[7,2]", {"order_id": 7, "line": 2, "sku": "B-2", "qty": 1}, {"user_id": 11})
    times["qty"] = h.update("order_items", "[7,1]", item, {**item, "qty": 3}, {"user_id": 12})
    customer = {"id": 5, "name": "Ada", "limit": Decimal("100.00")}
    times["customer"] = h.create("customers", "5", customer, {"user_id": 12, "endpoint": "/customers"})
    h.create("codes", "7", {"code": "7", "label": "seven"}, {"user_id": 12})
    h.create("log", None, {"message": "hello"}, {"job": "nightly"})
    times["end"] = h.clock
    return times


# -- keys of the wrong shape ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: history("order_items", 7, source=s), id="history-scalar"),
        pytest.param(lambda s: as_of("order_items", "now", key=7, source=s), id="as_of-scalar"),
        pytest.param(lambda s: blame("order_items", key=7, source=s), id="blame-scalar"),
        pytest.param(lambda s: history("order_items", (7, 1, 1), source=s), id="history-3-tuple"),
        pytest.param(lambda s: as_of("order_items", "now", key=(7, 1, 1), source=s), id="as_of-3-tuple"),
        pytest.param(lambda s: blame("order_items", key=[7], source=s), id="blame-1-list"),
    ],
)
def test_a_composite_key_of_the_wrong_shape_names_the_expected_shape(make: Make, call: object) -> None:
    h = History()
    _shop(h)
    source = make(h)
    with pytest.raises(ConfigurationError, match=r"primary key of order_items is \(order_id, line\)"):
        call(source)  # type: ignore[operator]


def test_a_dict_key_with_a_column_outside_the_key_is_refused(make: Make) -> None:
    h = History()
    _shop(h)
    with pytest.raises(ConfigurationError, match=r"\['sku'\] are not key columns"):
        history("order_items", {"order_id": 7, "line": 1, "sku": "A-1"}, source=make(h))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: history("customers", "abc", source=s), id="history"),
        pytest.param(lambda s: as_of("customers", "now", key="abc", source=s), id="as_of"),
        pytest.param(lambda s: blame("customers", key="abc", source=s), id="blame"),
        pytest.param(lambda s: history("order_items", (7, "x"), source=s), id="composite-part"),
    ],
)
def test_a_string_where_the_key_is_an_integer_names_the_value_and_the_column_type(
    make: Make, call: object
) -> None:
    h = History()
    _shop(h)
    source = make(h)
    with pytest.raises(ConfigurationError, match=r"'(abc|x)' is not an integer") as info:
        call(source)  # type: ignore[operator]
    assert "(integer)" in str(info.value)


def test_a_tuple_for_a_one_column_key_names_the_one_column(make: Make) -> None:
    h = History()
    _shop(h)
    with pytest.raises(ConfigurationError, match=r"is 2 values, but the primary key of customers is \(id\)"):
        history("customers", (5, 6), source=make(h))


def test_an_integer_key_out_of_its_columns_range_is_refused(make: Make) -> None:
    h = History()
    _shop(h)
    with pytest.raises(ConfigurationError, match="out of its range"):
        history("customers", 2**40, source=make(h))


def test_a_key_for_a_table_without_primary_key_is_refused(make: Make) -> None:
    h = History()
    _shop(h)
    with pytest.raises(ConfigurationError, match="log has no primary key"):
        history("log", 1, source=make(h))


def test_keys_in_the_forms_people_write_find_the_row(make: Make) -> None:
    """Text for an integer key, a JSON array (the command line), numpy integers, an int for a text key."""
    h = History()
    t = _shop(h)
    source = make(h)
    assert list(history("order_items", ("7", 1), source=source)["qty"]) == [2, 3]
    assert list(history("order_items", "[7, 1]", source=source)["qty"]) == [2, 3]
    assert list(history("order_items", {"line": 1, "order_id": 7}, source=source)["qty"]) == [2, 3]
    assert list(history("customers", np.int64(5), source=source)["name"]) == ["Ada"]
    assert list(history("customers", " 5", source=source)["name"]) == ["Ada"]
    assert len(as_of("order_items", t["end"], key=(np.int32(7), 2.0), source=source)) == 1
    assert len(as_of("codes", t["end"], key=7, source=source)) == 1
    cells = blame("order_items", key=("7", "1"), source=source)
    assert cells.loc[(7, 1, "qty"), "value"] == 3


# -- unknown context keys ---------------------------------------------------------------------------------
def test_audit_with_an_unknown_context_key_names_it_and_lists_the_known_ones(make: Make) -> None:
    h = History()
    _shop(h)
    with pytest.raises(ConfigurationError, match="context key 'usr_id' is in no change") as info:
        audit(usr_id=11, source=make(h))
    message = str(info.value)
    assert "'endpoint', 'job', 'user_id'" in message and "did you mean 'user_id'?" in message


def test_audit_with_a_known_key_and_no_match_stays_an_empty_answer(make: Make) -> None:
    """A real key whose value never occurs, or that occurs only in other tables or times, is no error;
    a typo still is."""
    h = History()
    t = _shop(h)
    source = make(h)
    assert audit(user_id=999, source=source).empty
    assert audit("log", user_id=11, source=source).empty  # user_id is a key of other tables' changes
    assert audit(since=t["customer"], endpoint="/orders", source=source).empty
    assert len(audit(user_id=11, source=source)) == 2
    with pytest.raises(ConfigurationError, match="'user'"):
        audit("log", user=11, source=source)


def test_audit_with_a_typo_next_to_a_matching_filter_still_names_the_typo(make: Make) -> None:
    h = History()
    _shop(h)
    with pytest.raises(ConfigurationError, match="'endpont'"):
        audit(user_id=11, endpont="/orders", source=make(h))


def test_audit_on_changes_without_any_context_key_cannot_tell_a_typo_and_answers_empty(make: Make) -> None:
    h = History()
    h.columns("customers", CUSTOMER_COLUMNS)
    h.create("customers", "5", {"id": 5, "name": "Ada", "limit": None})
    assert audit(user_id=1, source=make(h)).empty


# -- times in every form ----------------------------------------------------------------------------------
def test_numpy_and_pandas_times_give_the_same_answer_as_datetime(make: Make) -> None:
    h = History()
    t = _shop(h)
    source = make(h)
    moment = h.between(t["item"])
    expected = as_of("order_items", moment, source=source)
    naive = np.datetime64(moment.replace(tzinfo=None), "us")
    for form in (naive, np.datetime64(naive, "ns"), pd.Timestamp(moment), moment.isoformat()):
        pd.testing.assert_frame_equal(as_of("order_items", form, source=source), expected)
    assert list(expected.index) == [(7, 1)]
    changed = diff("order_items", naive, np.datetime64(t["qty"].replace(tzinfo=None), "us"), source=source)
    assert set(changed.reset_index()["column"]) == {"sku", "qty"}
    assert len(audit(since=naive, source=source)) == 5


@pytest.mark.parametrize(
    "value,message",
    [
        pytest.param("10:00", r"ts='10:00' is a time of day without a date", id="time-of-day"),
        pytest.param(np.datetime64("NaT"), r"ts=.*'NaT'.* is not a time \(NaT\)", id="numpy-nat"),
    ],
)
def test_as_of_with_a_bad_time_names_the_value(make: Make, value: object, message: str) -> None:
    h = History()
    _shop(h)
    with pytest.raises(ConfigurationError, match=message):
        as_of("customers", value, source=make(h))
