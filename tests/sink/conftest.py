"""Fixtures for the sink tests: real PostgreSQL and ClickHouse servers, a fresh place in each per test.

The servers start once per session (bench/databases.py: temp dirs, free
loopback ports, stopped by pid). Each test gets its own PostgreSQL schema or
ClickHouse database, so tests never see each other's tables. A server that
is not installed fails the tests that need it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from bench.databases import ClickHouse, Postgres
from tests.sink.dbs import ClickHouseDB, PostgresDB, SQLiteDB, TargetDB

FIXTURE_OF = {"sqlite": "sqlite_db", "postgresql": "postgres_db", "clickhouse": "clickhouse_db"}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    server = Postgres().init().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouse]:
    server = ClickHouse().start()
    yield server
    server.cleanup()


@pytest.fixture
def sqlite_db(tmp_path) -> SQLiteDB:  # type: ignore[no-untyped-def]
    return SQLiteDB(tmp_path / "sink.db")


@pytest.fixture
def postgres_db(postgres_server: Postgres) -> Iterator[PostgresDB]:
    db = PostgresDB(postgres_server, "t_" + uuid.uuid4().hex[:12])
    yield db
    db.drop()


@pytest.fixture
def clickhouse_db(clickhouse_server: ClickHouse) -> Iterator[ClickHouseDB]:
    db = ClickHouseDB(clickhouse_server, "t_" + uuid.uuid4().hex[:12])
    yield db
    db.drop()


@pytest.fixture(params=list(FIXTURE_OF))
def target_db(request: pytest.FixtureRequest) -> TargetDB:
    """Each of the three targets in turn."""
    db: TargetDB = request.getfixturevalue(FIXTURE_OF[request.param])
    return db
