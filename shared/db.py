"""Engines, sessions and migrations for the one database every process shares.

SQLite (the embedded default) is shared by the API and worker processes at once, so it runs in
WAL mode with a long busy timeout: writers queue for the lock instead of failing with
"database is locked". Schema changes go only through Alembic (``upgrade_to_head``), never
``create_all``, so what tests exercise is what production runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings

# migrations/ sits beside shared/ in the repository (and in the installed tree, see pyproject).
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK_ID = 0x10FA_F1EE

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a crash loses no commit
    cursor.close()


def _postgres_timeouts(dbapi_connection: Any, _record: Any) -> None:
    """Bound how long anyone waits for a row lock, and how long a stalled session may hold one.

    A worker frozen (SIGSTOP, a paused VM) inside a transaction keeps its row locks until it
    thaws; without these the reaper's UPDATE of that job would wait with it, and the job would
    never be requeued. With them the reaper's statement fails after ``lock_timeout`` (it retries
    next round) and the server ends the frozen session, releasing its locks.
    """
    settings = get_settings()
    cursor = dbapi_connection.cursor()
    cursor.execute(f"SET lock_timeout = {int(settings.db_lock_timeout_seconds * 1000)}")
    idle = int(settings.db_idle_in_transaction_seconds * 1000)
    cursor.execute(f"SET idle_in_transaction_session_timeout = {idle}")
    cursor.close()
    dbapi_connection.commit()  # a SET inside a rolled-back transaction would be undone


def make_engine(url: str, echo: bool = False) -> Engine:
    """A new engine for ``url``; SQLite gets its folder created and the pragmas above."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True  # survive a restarted Postgres without a failed request
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _postgres_timeouts)
    return engine


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: settings), created on first use."""
    url = url or get_settings().db_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url, echo=get_settings().sync_db_echo)
        return engine


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """The sessionmaker bound to ``get_engine(url)``.

    ``expire_on_commit=False``: services commit and then return the rows they wrote; callers must
    be able to read them after the commit without another round trip.
    """
    url = url or get_settings().db_url
    with _lock:
        factory = _factories.get(url)
    if factory is None:
        factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        with _lock:
            _factories[url] = factory
    return factory


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every pooled connection (tests switch databases; forked workers must not share)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


def alembic_config(url: str | None = None) -> Any:
    """An Alembic ``Config`` pointing at the repository's migrations, independent of the cwd."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in URL-encoded passwords.
    config.set_main_option("sqlalchemy.url", (url or get_settings().db_url).replace("%", "%%"))
    return config


@contextmanager
def _sqlite_migration_lock(url: str) -> Iterator[None]:
    """Serialise migrations of one SQLite file across processes (``serve --workers N``, ``up``).

    pysqlite runs DDL outside any transaction, so two processes migrating at once could both try
    to create a table; an advisory file lock beside the database prevents that.
    """
    import fcntl

    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        yield
        return
    lock_path = Path(parsed.database).expanduser()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{lock_path}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_alembic(url: str | None, action: str, revision: str) -> None:
    from alembic import command

    url = url or get_settings().db_url
    config = alembic_config(url)
    engine = make_engine(url)
    try:
        with _sqlite_migration_lock(url), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Migrations may wait for locks as long as they need (see _postgres_timeouts).
                connection.execute(text("SET LOCAL lock_timeout = 0"))
                # Several API replicas may start together: one migrates, the others wait here.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
                )
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def upgrade_to_head(url: str | None = None) -> None:
    """Migrate the database at ``url`` (default: settings) to the newest revision."""
    _run_alembic(url, "upgrade", "head")


def downgrade(url: str | None, revision: str) -> None:
    """Migrate down to ``revision`` (``base`` drops everything); used by migration tests."""
    _run_alembic(url, "downgrade", revision)
