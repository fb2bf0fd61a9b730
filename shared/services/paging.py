"""Keyset pages, newest first: the one way list endpoints page over an owner's rows.

The cursor is the last id of the previous page, resolved to its (created_at, id) in SQL, so a
page costs the same however many rows the owner holds, and ties on created_at stay stable.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from shared.errors import InvalidInput

Row = TypeVar("Row")


def newest_first_page(
    session: Session,
    model: type[Row],
    query: Select[Any],
    owner: str,
    after: str | None,
    limit: int,
    noun: str,
) -> tuple[list[Row], bool]:
    """(rows, has_more) of ``query`` (already filtered to ``owner``) after the row ``after``."""
    table: Any = model
    if after:
        cursor: Any = session.get(model, after, populate_existing=True)
        if cursor is None or cursor.owner != owner:
            raise InvalidInput(f"after {after!r} names no {noun} of yours", param="after")
        query = query.where(
            or_(
                table.created_at < cursor.created_at,
                and_(
                    table.created_at == cursor.created_at,
                    table.id < cursor.id,
                ),
            )
        )
    query = query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query.execution_options(populate_existing=True)))
    return rows[:limit], len(rows) > limit
