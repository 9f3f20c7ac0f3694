"""logd.sink.rows: records to rows; what cannot be mapped becomes a dead letter with its reason."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from logd.protocol import Record
from logd.sink.rows import by_shape, json_mapper, map_records, raw_mapper

COLUMNS = ("id", "user", "n", "tags")


def test_raw_rows_are_the_records_untouched() -> None:
    records = [(1, b"\x00\xff"), (2, b"")]
    rows, dead = map_records(records, raw_mapper, ("id", "body"))
    assert dead == []
    assert rows is records


def test_json_keys_name_columns_and_nested_values_become_json_text() -> None:
    rows, dead = map_records([(7, b'{"user": "ann", "tags": {"a": [1, 2]}}')], json_mapper, COLUMNS)
    assert dead == []
    assert (rows[0].id, rows[0].keys, rows[0].values) == (7, ("user", "tags"), ("ann", '{"a":[1,2]}'))


def test_bodies_that_cannot_be_mapped_become_dead_letters_with_reasons() -> None:
    records = [(1, b"{oops"), (2, b"[1]"), (3, b'{"colour": 1}'), (4, b'{"id": 9}'),
               (5, b"\xff"), (6, b'{"n": 1}')]
    rows, dead = map_records(records, json_mapper, COLUMNS)
    assert [r.id for r in rows] == [6]
    reasons = {d.id: d.error for d in dead}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "not JSON" in reasons[1] and "not JSON" in reasons[5]
    assert "not a JSON object but list" in reasons[2]
    assert "'colour'" in reasons[3]
    assert "'id'" in reasons[4]
    assert dead[0].body == b"{oops"


def test_a_custom_mapper_fills_columns_and_its_value_errors_are_dead_letters() -> None:
    def mapper(record: Record) -> dict[str, object]:
        if record.body == b"bad":
            raise ValueError("cannot map bad")
        return {"user": record.body.decode().upper()}

    rows, dead = map_records([(1, b"ann"), (2, b"bad")], mapper, COLUMNS)
    assert [(r.id, r.values) for r in rows] == [(1, ("ANN",))]
    assert [(d.id, d.error) for d in dead] == [(2, "cannot map bad")]


def test_rows_are_grouped_by_the_columns_they_fill_keeping_their_order() -> None:
    rows, _ = map_records([(i, b'{"n": 1}' if i % 2 else b'{"user": "x"}') for i in range(1, 6)],
                          json_mapper, COLUMNS)
    groups = by_shape(rows)
    assert {k: [r.id for r in v] for k, v in groups.items()} == {("n",): [1, 3, 5], ("user",): [2, 4]}


def _loads_outcome(body: bytes) -> tuple[str, object]:
    """What the plain json.loads rule makes of a body: the object, or the error text."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return ("error", f"not JSON: {exc}")
    return ("ok", value) if isinstance(value, dict) else ("error", f"not a JSON object but {type(value).__name__}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4),
       st.sampled_from(["", " ", "\n", " \t\r\n", "x", "}", ",1", "\x00"]),
       st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]), st.integers(0, 40), st.binary(max_size=2))
def test_the_fast_json_path_reads_bodies_exactly_as_json_loads(
    obj: dict[str, object], tail: str, encoding: str, cut: int, junk: bytes
) -> None:
    # Whole objects with trailing space or junk, other encodings, objects cut short or with bytes
    # inserted: the same object, or the same error text, as json.loads gives.
    text = json.dumps(obj, ensure_ascii=bool(cut % 2)) + tail
    body = text.encode(encoding)
    for candidate in (body, body[:cut], body[:cut] + junk + body[cut:]):
        want = _loads_outcome(candidate)
        try:
            got: tuple[str, object] = ("ok", dict(json_mapper(Record(1, candidate))))
        except ValueError as exc:
            got = ("error", str(exc))
        assert got == want
