"""Dataclasses to and from protobuf messages, field by field by name: a record's fields
are declared once, in the dataclass."""

from __future__ import annotations

import dataclasses


def to_message(record, message_class, **overrides):
    """`message_class` with the record's fields (tuples as repeated fields)."""
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    values.update(overrides)
    return message_class(**{name: list(value) if isinstance(value, tuple) else value for name, value in values.items()})


def message_fields(message, cls, exclude: tuple[str, ...] = ()) -> dict:
    """The values of `cls`'s fields in `message` (repeated fields as tuples), but `exclude`."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        value = getattr(message, f.name)
        values[f.name] = value if isinstance(value, (str, bytes, int, float, bool)) else tuple(value)
    return values
