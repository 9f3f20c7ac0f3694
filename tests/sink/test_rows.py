"""logd.sink.rows: records to rows; what cannot be mapped becomes a dead letter with its reason."""

from __future__ import annotations

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
