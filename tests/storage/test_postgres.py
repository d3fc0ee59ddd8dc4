"""PostgreSQL-specific properties: schema gating, the locks the commit takes, split
counters and driver-error mapping. Against the real server of the test command."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from sbus.core import errors as e
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.types import CreateOp, Limits, ReadItem, Txn, WriteOp
from sbus.storage.sql.postgres import (
    COUNTER_SLOTS,
    PostgresStore,
    SchemaOutOfDate,
    _dollar_quoted,
    asyncpg_dsn,
)
from tests import backends


@pytest.fixture
async def pg() -> AsyncIterator[PostgresStore]:
    await backends.require("postgres")
    await backends.wipe("postgres")
    store = PostgresStore(backends.POSTGRES_URL, Limits())
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def raw() -> AsyncIterator[asyncpg.Connection]:
    await backends.require("postgres")
    conn = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    yield conn
    await conn.close()


async def test_out_of_date_schema_refuses_and_names_migrate(raw: asyncpg.Connection) -> None:
    name = "sbus_fresh_" + uuid.uuid4().hex[:8]
    await raw.execute(f"CREATE DATABASE {name}")
    try:
        url = backends.POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
        store = PostgresStore(url, Limits())
        with pytest.raises(SchemaOutOfDate) as info:
            await store.start()
        assert "sbus migrate" in info.value.detail
        await store.migrate()
        await store.start()
        await store.close()
    finally:
        await raw.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_unreachable_server_is_not_applied() -> None:
    store = PostgresStore("postgresql+asyncpg://postgres@127.0.0.1:9/postgres", Limits())
    with pytest.raises(e.StoreUnavailable) as info:
        await store.start()
    assert info.value.fields["outcome"] == "not_applied"


async def test_load_locks_written_rows_for_update_and_read_rows_for_share(
    pg: PostgresStore, raw: asyncpg.Connection
) -> None:
    for key in ("a", "r", "w", "z"):
        await pg.create(CreateOp(key, "v0", "", False, "", new_commit_id()))
    conn = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.fetchval(
            "SELECT sbus_txn_load($1, $2, $3, $4, $5, $6, $7)",
            "A",
            "",
            ["w"],
            ["a", "r", "z"],
            [],
            [],
            None,
        )
        await raw.execute("SET lock_timeout = '200ms'")
        # Every read-only row of a run is locked, not just the first (a, r) or a lone
        # one after the written key (z).
        for key in ("a", "z"):
            with pytest.raises(asyncpg.LockNotAvailableError):
                await raw.execute("UPDATE sbus_shards SET version = 9 WHERE key = $1", key)
        # A read-only row is shared: others may share it but not update it ...
        assert await raw.fetchval("SELECT version FROM sbus_shards WHERE key = 'r' FOR SHARE") == 0
        with pytest.raises(asyncpg.LockNotAvailableError):
            await raw.execute("UPDATE sbus_shards SET version = 9 WHERE key = 'r'")
        # ... and a written row is exclusive.
        with pytest.raises(asyncpg.LockNotAvailableError):
            await raw.fetchval("SELECT version FROM sbus_shards WHERE key = 'w' FOR SHARE")
        await tx.rollback()
        assert await raw.fetchval("SELECT version FROM sbus_shards WHERE key = 'w' FOR SHARE") == 0
    finally:
        await conn.close()


async def test_counters_are_split_over_slots(pg: PostgresStore, raw: asyncpg.Connection) -> None:
    await pg.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
    for version in range(40):
        txn = commit_txn(
            op="commit",
            agent_id="A",
            session_id="",
            writes=[WriteOp("k", version, "commit", str(version))],
            read_set=[ReadItem("k", version)],
            rationale=None,
            idem=None,
        )
        await pg.apply(txn)
    rows = await raw.fetch(
        "SELECT slot, value FROM sbus_counters WHERE name = 'total_commits' ORDER BY slot"
    )
    assert sum(r["value"] for r in rows) == 40
    assert 1 < len(rows) <= COUNTER_SLOTS  # 40 commits over 16 slots: several rows
    assert (await pg.stats()).counters.total_commits == 40


def commit(content: str, *, rationale: str | None = None, session: str = "") -> Txn:
    """Agent A's commit of shard ``k`` from version 0."""
    return commit_txn(
        op="commit",
        agent_id="A",
        session_id=session,
        writes=[WriteOp("k", 0, "commit", content)],
        read_set=[],
        rationale=rationale,
        idem=None,
    )


@contextlib.contextmanager
def apply_sends(store: PostgresStore, sql: str) -> Iterator[None]:
    """Inside the block, ``sql`` travels with COMMIT in place of the apply call."""
    real = store._apply_statement
    store._apply_statement = lambda payload: sql  # type: ignore[method-assign]
    try:
        yield
    finally:
        store._apply_statement = real  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "content",
    ["$j$", "x $j$); DROP TABLE sbus_shards; --", "$j$$jab$ ' '' \\ \\' ü€ \u2028", "end $"],
)
async def test_content_travels_intact_with_the_commit(
    pg: PostgresStore, raw: asyncpg.Connection, content: str
) -> None:
    """The apply call rides with COMMIT as SQL text (a dollar-quoted literal): content
    that looks like the quote tag, quotes or SQL must arrive byte for byte."""
    await pg.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
    out = await pg.apply(commit(content, rationale=content))
    assert out.body is not None and out.body["new_version"] == 1
    assert (await pg.read("k", None, "", False)).content == content
    assert await raw.fetchval("SELECT count(*) FROM sbus_shards") == 1
    (entry,) = [h for h in await pg.history("k", None, 10) if h.version == 1]
    assert (entry.content, entry.rationale) == (content, content)


async def test_a_failing_apply_skips_the_commit(pg: PostgresStore, raw: asyncpg.Connection) -> None:
    """If the statement sent with COMMIT fails, PostgreSQL skips the COMMIT: nothing of
    the transaction lands, and the answer is not_applied."""
    await pg.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
    txn = commit("new", session="s")
    with apply_sends(pg, "SELECT 1/0"), pytest.raises(e.StoreUnavailable) as info:
        await pg.apply(txn)
    assert info.value.fields["outcome"] == "not_applied"
    assert (await pg.read("k", None, "", False)).version == 0
    assert await raw.fetchval("SELECT count(*) FROM sbus_history WHERE key = 'k'") == 1
    assert (await pg.stats()).counters.total_commits == 0
    out = await pg.apply(txn)  # the connection went back to the pool clean
    assert out.body is not None and out.body["new_version"] == 1


async def test_a_connection_lost_with_the_commit_in_flight_is_unknown(pg: PostgresStore) -> None:
    """The apply and COMMIT travel together: if the connection dies while they are in
    flight (here the backend terminates itself mid-statement), the client cannot know
    whether the COMMIT landed, so the answer must be ``unknown``, never ``not_applied``;
    the store then recovers on a fresh connection."""
    await pg.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
    txn = commit("new")
    suicide = "SELECT pg_terminate_backend(pg_backend_pid())"
    with apply_sends(pg, suicide), pytest.raises(e.StoreUnavailable) as info:
        await pg.apply(txn)
    assert info.value.fields["outcome"] == "unknown"
    out = await pg.apply(txn)
    assert out.body is not None and out.body["new_version"] == 1


async def test_a_connection_released_inside_a_transaction_is_not_reused() -> None:
    """A use that could not roll back may release its connection inside a transaction;
    the connection is closed instead of pooled, so no later use runs inside it."""
    await backends.require("postgres")
    await backends.wipe("postgres")
    store = PostgresStore(backends.POSTGRES_URL, Limits(), pool_size=1)
    await store.start()
    try:
        await store.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
        await store.create(CreateOp("o", "o0", "", False, "", new_commit_id()))
        async with store._conn() as conn:
            await conn.execute("BEGIN")
            await conn.execute("UPDATE sbus_shards SET content = 'stale' WHERE key = 'o'")
        # The same (only) connection again: the next commit must not run inside that
        # transaction (its COMMIT would make the stray update durable).
        out = await store.apply(commit("fresh"))
        assert out.body is not None and out.body["new_version"] == 1
        async with store._conn() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT content FROM sbus_shards WHERE key = 'k'") == "fresh"
            assert await conn.fetchval("SELECT content FROM sbus_shards WHERE key = 'o'") == "o0"
    finally:
        await store.close()


@pytest.mark.parametrize("text", ["", "$j", "a$j", "$j$", "x$j$y$j", "{}$", "$"])
async def test_dollar_quoting_survives_its_own_tag(raw: asyncpg.Connection, text: str) -> None:
    literal = _dollar_quoted(text)
    assert await raw.fetchval(f"SELECT {literal}::text") == text


async def test_a_cancelled_commit_leaves_no_open_transaction(raw: asyncpg.Connection) -> None:
    """A request cancelled while its commit is in flight (the client went away) must not
    leave a transaction open on a pooled connection, holding the shard's row lock until
    that connection happens to be reused: the connection is closed, so the server ends
    the transaction as soon as the statement in flight finishes (here a 1 s sleep
    standing in for the apply), and another replica's commit of the key goes through."""
    await backends.wipe("postgres")
    store = PostgresStore(backends.POSTGRES_URL, Limits(), pool_size=2)
    await store.start()
    try:
        await store.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
        with apply_sends(store, "SELECT pg_sleep(1)"):
            task = asyncio.create_task(store.apply(commit("new")))
            await asyncio.sleep(0.4)  # BEGIN and the load (row lock on k) are done by now
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # Another replica commits the key: it must not wait on a lock that the cancelled
        # request's connection still holds, idle in the first replica's pool.
        other = PostgresStore(backends.POSTGRES_URL, Limits(), pool_size=2)
        await other.start()
        try:
            out = await asyncio.wait_for(other.apply(commit("after")), timeout=5)
        finally:
            await other.close()
        assert out.body is not None and out.body["new_version"] == 1
        stuck = await raw.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        )
        assert stuck == 0
    finally:
        await store.close()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every message the store sends through asyncpg's query methods, by its start: one
    entry per round trip (each method waits for its answer)."""
    log: list[str] = []
    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        real = getattr(asyncpg.Connection, name)

        async def spy(self: asyncpg.Connection, query: str, *args: object, _real=real) -> object:  # type: ignore[no-untyped-def]
            log.append(query)
            return await _real(self, query, *args)

        monkeypatch.setattr(asyncpg.Connection, name, spy)
    return log


async def test_a_commit_and_a_refusal_each_take_three_round_trips(
    pg: PostgresStore, raw: asyncpg.Connection, sent: list[str]
) -> None:
    """BEGIN, the load, then the effects with COMMIT in one message: also for a refused
    commit, whose counter writes ride with its COMMIT."""
    await pg.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
    sent.clear()
    out = await pg.apply(commit("new"))
    assert out.body is not None and out.body["new_version"] == 1
    assert [q.split("(")[0] for q in sent] == [
        "BEGIN ISOLATION LEVEL READ COMMITTED",
        "SELECT sbus_txn_load",
        "SELECT sbus_txn_apply",
    ]
    assert sent[-1].endswith(";\nCOMMIT")
    sent.clear()
    with pytest.raises(e.VersionMismatch):
        await pg.apply(commit("stale"))  # from version 0 again
    assert [q.split("(")[0] for q in sent] == [
        "BEGIN ISOLATION LEVEL READ COMMITTED",
        "SELECT sbus_txn_load",
        "SELECT sbus_txn_apply",
    ]
    assert sent[-1].endswith(";\nCOMMIT")
    stats = (await pg.stats()).counters
    assert (stats.total_commits, stats.total_conflicts) == (1, 1)
    assert await raw.fetchval("SELECT conflict_count FROM sbus_shards WHERE key = 'k'") == 1


async def test_a_refusal_whose_counters_fail_is_not_applied(pg: PostgresStore) -> None:
    """The refusal's counter writes travel as the statement sent with COMMIT: if it
    fails, nothing lands and the answer is not_applied, not the refusal."""
    await pg.create(CreateOp("k", "v0", "", False, "", new_commit_id()))
    await pg.apply(commit("new"))
    with apply_sends(pg, "SELECT 1/0"), pytest.raises(e.StoreUnavailable) as info:
        await pg.apply(commit("stale"))
    assert info.value.fields["outcome"] == "not_applied"
    assert (await pg.stats()).counters.total_conflicts == 0


async def test_hot_path_functions_keep_their_plans(
    pg: PostgresStore, raw: asyncpg.Connection
) -> None:
    """No function of the store is LANGUAGE sql, whose body PostgreSQL plans again on every
    call from a new transaction (each read and commit is one); the load forces generic
    plans, which its array-parameter statements would otherwise be planned afresh for."""
    rows = await raw.fetch(
        "SELECT p.proname, l.lanname, p.proconfig FROM pg_proc p "
        "JOIN pg_language l ON l.oid = p.prolang WHERE p.proname LIKE 'sbus\\_%'"
    )
    assert {r["proname"]: r["lanname"] for r in rows if r["lanname"] != "plpgsql"} == {}
    config = {r["proname"]: r["proconfig"] for r in rows}
    assert config["sbus_txn_load"] == ["plan_cache_mode=force_generic_plan"]
