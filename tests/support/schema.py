"""The reference schema loaded into the test database ``app``.

The rows are generated deterministically so that tests can compare what a client receives,
directly or through pgguard, with exact expected values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

ITEM_COUNT = 100

ITEMS_DDL = """
CREATE TABLE IF NOT EXISTS public.items (
    id      int PRIMARY KEY,
    name    text NOT NULL,
    price   numeric(12, 2),
    created timestamptz,
    data    jsonb,
    blob    bytea
)
"""


@dataclass(frozen=True)
class Item:
    id: int
    name: str
    price: Decimal
    created: datetime
    data: dict[str, Any] | None
    blob: bytes | None

    def as_tuple(self) -> tuple[int, str, Decimal, datetime, dict[str, Any] | None, bytes | None]:
        return (self.id, self.name, self.price, self.created, self.data, self.blob)


def _item(i: int) -> Item:
    name = f"item-{i:03d}"
    if i % 25 == 0:
        name += "-ünïcødé ✓"
    cents = i * 125
    price = Decimal(f"{cents // 100}.{cents % 100:02d}")
    created = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(
        hours=i, seconds=i, microseconds=i * 1234
    )
    data: dict[str, Any] | None = None
    if i % 10 != 0:
        data = {
            "i": i,
            "even": i % 2 == 0,
            "tags": [f"t{i % 3}", "x"],
            "nested": {"sq": i * i},
            "quarter": i / 4,
        }
    blob: bytes | None = None
    if i % 7 != 0:
        blob = bytes((i * k) % 256 for k in range(i % 17))
    return Item(i, name, price, created, data, blob)


ITEMS: list[Item] = [_item(i) for i in range(1, ITEM_COUNT + 1)]


def create_schema(conn: psycopg.Connection[Any]) -> None:
    """Create and fill ``public.items`` (idempotent: an existing full table is left alone)."""
    conn.execute(ITEMS_DDL)
    row = conn.execute("SELECT count(*) FROM public.items").fetchone()
    if row is not None and row[0] == ITEM_COUNT:
        return
    conn.execute("TRUNCATE public.items")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.items (id, name, price, created, data, blob)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (
                    it.id,
                    it.name,
                    it.price,
                    it.created,
                    None if it.data is None else Jsonb(it.data),
                    it.blob,
                )
                for it in ITEMS
            ],
        )


def item_json(it: Item) -> str | None:
    """The item's ``data`` as PostgreSQL's jsonb output would print it (keys sorted by length,
    then bytewise; ``", "`` and ``": "`` separators)."""
    if it.data is None:
        return None
    return _jsonb_text(it.data)


def _jsonb_text(value: Any) -> str:
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{json.dumps(k)}: {_jsonb_text(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_jsonb_text(v) for v in value) + "]"
    return json.dumps(value)


def pg_timestamptz_text(value: datetime) -> str:
    """``value`` as PostgreSQL prints a timestamptz with DateStyle ISO and TimeZone UTC."""
    v = value.astimezone(UTC)
    text = v.strftime("%Y-%m-%d %H:%M:%S")
    if v.microsecond:
        text += "." + f"{v.microsecond:06d}".rstrip("0")
    return text + "+00"


def item_psql_row(it: Item, sep: str = "|") -> str:
    """The row as ``psql -At`` prints ``SELECT id, name, price, created, data, blob``."""
    cells = [
        str(it.id),
        it.name,
        str(it.price),
        pg_timestamptz_text(it.created),
        item_json(it) or "",
        "" if it.blob is None else "\\x" + it.blob.hex(),
    ]
    return sep.join(cells)
