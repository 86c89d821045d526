"""Files, batches and each batch's requests, kept in one SQLite file in the state dir
(``<state_dir>/batches.sqlite``), so that a restart loses nothing.

* ``files``: uploads and the output/error files the gateway writes, content included.
* ``batches``: one row per batch: its OpenAI object (``doc``, without the figures computed
  from its lines), its carbon ``plan``, and who runs it (``owner`` until ``lease_until``).
* ``lines``: a batch's requests, copied from its input file when it is created. A line is
  *done* once its result (the output or error line) is written, in the same transaction
  that marks it done; a line that is not done is run (again) by whoever runs the batch.

Every change is one transaction in WAL mode with ``synchronous=FULL``: once a call
returns, it survives a crash. Several worker processes share the file; a batch is run by
one of them at a time (:meth:`BatchStore.claim`, a lease renewed while it runs and given up
at shutdown).

No SQLite call runs on the event loop: one worker thread owns the connection and runs the
operations in turn (:meth:`BatchStore.call`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER, endpoint TEXT, content BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant, seq);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    status TEXT NOT NULL, doc TEXT NOT NULL, plan TEXT NOT NULL,
    owner TEXT, lease_until REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS batches_tenant ON batches (tenant, seq);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, body BLOB NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0, result BLOB,
    attempts INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER, completion_tokens INTEGER,
    energy_joules REAL, facility_joules REAL, co2_g REAL, co2_g_if_immediate REAL,
    PRIMARY KEY (batch_id, idx));
"""

_ACTIVE = "('validating', 'in_progress', 'finalizing', 'cancelling')"


@dataclass
class FileRow:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None
    endpoint: str | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__


@dataclass
class BatchRow:
    id: str
    tenant: str
    status: str
    #: The batch's OpenAI object as stored (timestamps, ids, metadata).
    doc: dict[str, Any]
    #: The scheduler's plan: when to start, its carbon source, the submit-time intensity.
    plan: dict[str, Any]


@dataclass
class Totals:
    """What a batch's lines add up to."""

    total: int = 0
    done: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    energy_joules: float = 0.0
    facility_joules: float = 0.0
    co2_g: float = 0.0
    co2_g_if_immediate: float = 0.0
    #: Lines whose carbon is known (a request that failed before any usage has none).
    with_carbon: int = 0


@dataclass
class LineResult:
    """What one finished request leaves: its output or error line and its footprint."""

    ok: bool
    line: dict[str, Any]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    energy_joules: float | None = None
    facility_joules: float | None = None
    co2_g: float | None = None
    co2_g_if_immediate: float | None = None


class BatchStore:
    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None  # owned by the worker thread
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-batches")

    # -- plumbing ---------------------------------------------------------------------------

    async def call(self, operation: Callable[..., T], *args: Any) -> T:
        """Run ``operation(*args)`` (a method of this store) in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, operation, *args)

    def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._worker.submit(shut).result()
        self._worker.shutdown(wait=True)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One thread at a time uses it (the worker; a synchronous caller such as a
            # test or a CLI), never two at once.
            db = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_s,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # -- files ------------------------------------------------------------------------------

    _FILE_COLS = "id, tenant, purpose, filename, bytes, created_at, expires_at, endpoint"

    def put_file(self, row: FileRow, content: bytes) -> None:
        self._tx(lambda db: db.execute(
            f"INSERT INTO files ({self._FILE_COLS}, content) VALUES (?,?,?,?,?,?,?,?,?)",
            (row.id, row.tenant, row.purpose, row.filename, row.bytes, row.created_at,
             row.expires_at, row.endpoint, content)))

    def get_file(self, tenant: str, file_id: str) -> FileRow | None:
        found = self._conn().execute(
            f"SELECT {self._FILE_COLS} FROM files WHERE id = ? AND tenant = ?",
            (file_id, tenant)).fetchone()
        return FileRow(*found) if found else None

    def file_content(self, tenant: str, file_id: str) -> bytes | None:
        found = self._conn().execute("SELECT content FROM files WHERE id = ? AND tenant = ?",
                                     (file_id, tenant)).fetchone()
        return bytes(found[0]) if found else None

    def list_files(self, tenant: str, purpose: str | None, limit: int, descending: bool,
                   after: str | None) -> tuple[list[FileRow], bool]:
        op, order = ("<", "DESC") if descending else (">", "ASC")
        where, args = ["tenant = ?"], [tenant]
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            where.append(f"seq {op} (SELECT seq FROM files WHERE id = ? AND tenant = ?)")
            args += [after, tenant]
        rows = self._conn().execute(
            f"SELECT {self._FILE_COLS} FROM files WHERE {' AND '.join(where)} "
            f"ORDER BY seq {order} LIMIT ?", (*args, limit + 1)).fetchall()
        return [FileRow(*r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, tenant: str, file_id: str) -> bool:
        return self._tx(lambda db: db.execute(
            "DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount > 0)

    def purge_files(self, now: int) -> int:
        """Delete the files whose ``expires_at`` has passed; how many."""
        return self._tx(lambda db: db.execute(
            "DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
            (now,)).rowcount)

    # -- batches ----------------------------------------------------------------------------

    def create_batch(self, tenant: str, doc: dict[str, Any], plan: dict[str, Any],
                     lines: Iterable[tuple[str, bytes]]) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO batches (id, tenant, status, doc, plan) VALUES (?,?,?,?,?)",
                       (doc["id"], tenant, doc["status"], orjson.dumps(doc).decode(),
                        orjson.dumps(plan).decode()))
            db.executemany("INSERT INTO lines (batch_id, idx, custom_id, body) VALUES (?,?,?,?)",
                           ((doc["id"], i, cid, body) for i, (cid, body) in enumerate(lines)))
        self._tx(work)

    @staticmethod
    def _batch(found: tuple[Any, ...]) -> BatchRow:
        return BatchRow(found[0], found[1], found[2], orjson.loads(found[3]),
                        orjson.loads(found[4]))

    def get_batch(self, tenant: str | None, batch_id: str) -> BatchRow | None:
        return self._find(self._conn(), batch_id, tenant)

    def _find(self, db: sqlite3.Connection, batch_id: str,
              tenant: str | None = None) -> BatchRow | None:
        """The batch ``batch_id`` (of ``tenant``, when given), or None."""
        sql = "SELECT id, tenant, status, doc, plan FROM batches WHERE id = ?"
        args: tuple[str, ...] = (batch_id,)
        if tenant is not None:
            sql, args = sql + " AND tenant = ?", (batch_id, tenant)
        found = db.execute(sql, args).fetchone()
        return self._batch(found) if found else None

    def list_batches(self, tenant: str, after: str | None,
                     limit: int) -> tuple[list[BatchRow], bool]:
        where, args = "tenant = ?", [tenant]
        if after is not None:
            where += " AND seq < (SELECT seq FROM batches WHERE id = ? AND tenant = ?)"
            args += [after, tenant]
        rows = self._conn().execute(
            f"SELECT id, tenant, status, doc, plan FROM batches WHERE {where} "
            "ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        return [self._batch(r) for r in rows[:limit]], len(rows) > limit

    def update_batch(self, batch_id: str, changes: dict[str, Any],
                     only_from: tuple[str, ...] | None = None) -> BatchRow | None:
        """Merge ``changes`` into the batch's object (``status`` included), provided its
        status is one of ``only_from`` (any when None); the row after, or None if not."""
        def work(db: sqlite3.Connection) -> BatchRow | None:
            row = self._find(db, batch_id)
            if row is None:
                return None
            if only_from is not None and row.status not in only_from:
                return None
            row.doc.update(changes)
            row.status = row.doc["status"]
            db.execute("UPDATE batches SET status = ?, doc = ? WHERE id = ?",
                       (row.status, orjson.dumps(row.doc).decode(), batch_id))
            return row
        return self._tx(work)

    def set_plan(self, batch_id: str, plan: dict[str, Any]) -> None:
        self._tx(lambda db: db.execute("UPDATE batches SET plan = ? WHERE id = ?",
                                       (orjson.dumps(plan).decode(), batch_id)))

    def claim(self, owner: str, now: float, lease_s: float) -> list[BatchRow]:
        """The unfinished batches this process runs now: those it holds, and those nobody
        holds or whose holder's lease ran out (a process that died), taken over."""
        def work(db: sqlite3.Connection) -> list[BatchRow]:
            db.execute(f"UPDATE batches SET owner = ?, lease_until = ? WHERE status IN {_ACTIVE} "
                       "AND (owner IS NULL OR owner = ? OR lease_until < ?)",
                       (owner, now + lease_s, owner, now))
            rows = db.execute("SELECT id, tenant, status, doc, plan FROM batches WHERE "
                              f"status IN {_ACTIVE} AND owner = ? ORDER BY seq",
                              (owner,)).fetchall()
            return [self._batch(r) for r in rows]
        return self._tx(work)

    def release(self, owner: str) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE batches SET owner = NULL, lease_until = 0 WHERE owner = ?", (owner,)))

    # -- lines ------------------------------------------------------------------------------

    def pending_lines(self, batch_id: str, after: int, limit: int
                      ) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` lines not done, past index ``after``, in order."""
        return [(i, c, bytes(b)) for i, c, b in self._conn().execute(
            "SELECT idx, custom_id, body FROM lines WHERE batch_id = ? AND done = 0 AND idx > ? "
            "ORDER BY idx LIMIT ?", (batch_id, after, limit))]

    def start_line(self, batch_id: str, idx: int) -> int:
        """Count an attempt at a line before its request is sent; the attempts so far."""
        def work(db: sqlite3.Connection) -> int:
            db.execute("UPDATE lines SET attempts = attempts + 1 WHERE batch_id = ? AND idx = ?",
                       (batch_id, idx))
            found = db.execute("SELECT attempts FROM lines WHERE batch_id = ? AND idx = ?",
                               (batch_id, idx)).fetchone()
            return int(found[0])
        return self._tx(work)

    def finish_line(self, batch_id: str, idx: int, result: LineResult) -> bool:
        """Write a line's result and mark it done, atomically; False if it already was."""
        return self._tx(lambda db: db.execute(
            "UPDATE lines SET done = 1, ok = ?, result = ?, prompt_tokens = ?, "
            "completion_tokens = ?, energy_joules = ?, facility_joules = ?, co2_g = ?, "
            "co2_g_if_immediate = ? WHERE batch_id = ? AND idx = ? AND done = 0",
            (int(result.ok), orjson.dumps(result.line), result.prompt_tokens,
             result.completion_tokens, result.energy_joules, result.facility_joules,
             result.co2_g, result.co2_g_if_immediate, batch_id, idx)).rowcount > 0)

    def attempts(self, batch_id: str) -> dict[str, int]:
        """custom_id → how many times its request was sent (for operators and tests)."""
        return {c: int(a) for c, a in self._conn().execute(
            "SELECT custom_id, attempts FROM lines WHERE batch_id = ?", (batch_id,))}

    def totals(self, batch_id: str) -> Totals:
        found = self._conn().execute(
            "SELECT count(*), sum(done), sum(done AND ok), sum(done AND NOT ok), "
            "sum(prompt_tokens), sum(completion_tokens), sum(energy_joules), "
            "sum(facility_joules), sum(co2_g), sum(co2_g_if_immediate), count(co2_g) "
            "FROM lines WHERE batch_id = ?", (batch_id,)).fetchone()
        return Totals(*(v or 0 for v in found))

    def finalize(self, batch_id: str, changes: dict[str, Any], files: list[FileRow],
                 unfinished: Callable[[int, str], dict[str, Any]] | None,
                 ) -> BatchRow | None:
        """End a batch in one transaction: lines not done get ``unfinished(idx, custom_id)``
        as their error line (when given), the output and error files are written from the
        lines (``files``: the output file's row, then the error file's, sizes filled in
        here; a file with no line is left out and its id in ``changes`` set to None), and
        the batch takes ``changes``."""
        def work(db: sqlite3.Connection) -> BatchRow | None:
            row = self._find(db, batch_id)
            if row is None:
                return None
            if row.status not in ("validating", "in_progress", "finalizing", "cancelling"):
                return row  # ended already (by another process)
            if unfinished is not None:
                left = db.execute("SELECT idx, custom_id FROM lines WHERE batch_id = ? AND "
                                  "done = 0", (batch_id,)).fetchall()
                db.executemany("UPDATE lines SET done = 1, ok = 0, result = ? WHERE "
                               "batch_id = ? AND idx = ?",
                               ((orjson.dumps(unfinished(i, c)), batch_id, i) for i, c in left))
            for ok, file, key in ((1, files[0], "output_file_id"),
                                  (0, files[1], "error_file_id")):
                content = b"".join(bytes(r[0]) + b"\n" for r in db.execute(
                    "SELECT result FROM lines WHERE batch_id = ? AND done = 1 AND ok = ? "
                    "ORDER BY idx", (batch_id, ok)))
                if not content:
                    changes[key] = None
                    continue
                file.bytes = len(content)
                db.execute(f"INSERT INTO files ({self._FILE_COLS}, content) "
                           "VALUES (?,?,?,?,?,?,?,?,?)",
                           (file.id, file.tenant, file.purpose, file.filename, file.bytes,
                            file.created_at, file.expires_at, file.endpoint, content))
                changes[key] = file.id
            row.doc.update(changes)
            row.status = row.doc["status"]
            db.execute("UPDATE batches SET status = ?, doc = ?, owner = NULL, lease_until = 0 "
                       "WHERE id = ?", (row.status, orjson.dumps(row.doc).decode(), batch_id))
            return row
        return self._tx(work)
