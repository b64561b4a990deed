"""The schema's migrations: plain SQL files under ``migrations/<engine>/``, applied in the
order of their names at start, each once, and recorded in ``schema_migrations``.

A file is named ``NNNN_what.sql`` (four digits, then lower-case words); its name without
``.sql`` is its version. Files are only ever added, never edited once released: a store opened
on a database that has a version recorded does not run that file again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

__all__ = ["Migration", "migrations"]

_NAME = re.compile(r"(\d{4}_[a-z0-9_]+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file. ``version``: its name without ``.sql`` (``0001_conversations``).
    ``sql``: its text, one or more statements."""

    version: str
    sql: str


def migrations(engine: Literal["sqlite", "postgres"]) -> list[Migration]:
    """The migrations shipped for ``engine``, in the order they apply. Raises ``ValueError``
    for a file under ``migrations/<engine>/`` that is not named ``NNNN_what.sql``."""
    folder = resources.files(__package__).joinpath("migrations").joinpath(engine)
    found = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match is None:
            raise ValueError(f"migrations/{engine}/{entry.name}: not named NNNN_what.sql")
        found.append(Migration(match.group(1), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)
