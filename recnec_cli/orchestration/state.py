"""The nightly state: one SQLite file that remembers every study recnec has scanned.

A scan commits each finished study here in one transaction as soon as it is done; the report and
the manifest are regenerated from this file, never from memory, so a run killed at any moment
(SIGKILL included) loses no finished study and the next run carries on where it stopped.

Layout (schema version :data:`SCHEMA_VERSION`):

``studies``
    one row per study id ever seen: ``fingerprint`` (what the result depends on, see
    :func:`study_fingerprint`; ``NULL`` for a deferred study, so the next run picks it up),
    ``status``, ``row`` (the report row as JSON), ``run_id`` and ``processed_utc`` of the run that
    produced it, ``present`` (1 while the study is still in the tree) and ``last_seen_run``.
``runs``
    one row per run: start / finish (UTC, ISO 8601), input root, report path, the run's summary
    counts and its exit code (``NULL`` while running or when the run was killed).
``dicom_objects``
    the DICOM objects (``--dicom-out``) of each study: kind (``SEG``, ``SR``, ``SC``), SOP Class
    and Instance UIDs, path, the digest of their content and when they were written.
``sends``
    one row per (PACS, SOP Instance UID): ``pending`` (queued, never tried), ``sent`` or
    ``failed`` (tried; ``message`` says why), the number of attempts and the last one (UTC). A
    run delivers every current object that is not ``sent`` to its ``--send`` destination.
``timeline``
    per study id the keyed patient pseudonym, the acquisition date-time (ISO 8601) and the BIDS
    session label found by discovery: the patient's timeline (:mod:`recnec_cli.timeline`). Dates
    live here only; reports carry intervals in days.
``follow_up_maps``
    per processed study a small picture of its result for comparisons with later scans
    (:class:`recnec_cli.stages.followup.FollowUpMap`: the T1ce and the lesion labels at 2 mm,
    about 0.3 MB compressed) and the digest of those bytes.
``lesion_matches``
    per (study, earlier study) pair whether their lesions overlap after rigid registration, for
    the map digests it was computed from (a re-processed study is matched again).
``discovery``
    the last discovery of each input root: the stat listing of the tree (path, size, mtime) and the
    studies found in it, so a run over an unchanged tree opens no input file at all.

SQLite's locking is unreliable on network file systems (NFS, GPFS, Lustre, SMB): keep the state on
a local disk. It runs in ``journal_mode=WAL`` with ``synchronous=FULL`` (SQLite docs, "Write-Ahead
Logging"): a committed study survives a killed process and a power loss.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import UsageError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_id TEXT PRIMARY KEY,
    fingerprint TEXT,
    status TEXT NOT NULL,
    row TEXT NOT NULL,
    run_id TEXT NOT NULL,
    processed_utc TEXT NOT NULL,
    present INTEGER NOT NULL DEFAULT 1,
    last_seen_run TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_utc TEXT NOT NULL,
    finished_utc TEXT,
    input_root TEXT NOT NULL,
    report TEXT,
    summary TEXT,
    exit_code INTEGER,
    stop_reason TEXT
);
CREATE TABLE IF NOT EXISTS dicom_objects (
    study_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    written_utc TEXT NOT NULL,
    PRIMARY KEY (study_id, kind)
);
CREATE TABLE IF NOT EXISTS sends (
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    study_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_utc TEXT,
    message TEXT,
    PRIMARY KEY (destination, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS timeline (
    study_id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    acquired TEXT NOT NULL,
    session TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS follow_up_maps (
    study_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS lesion_matches (
    study_id TEXT NOT NULL,
    ref_study_id TEXT NOT NULL,
    digests TEXT NOT NULL,
    status TEXT NOT NULL,
    overlap REAL,
    note TEXT NOT NULL,
    PRIMARY KEY (study_id, ref_study_id)
);
CREATE TABLE IF NOT EXISTS discovery (
    input_root TEXT PRIMARY KEY,
    listing_sha256 TEXT NOT NULL,
    studies BLOB NOT NULL,
    recnec_version TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredStudy:
    """One study as the state holds it (``row`` is the report row, a flat dict)."""

    study_id: str
    fingerprint: str | None
    status: str
    row: Mapping[str, Any]
    run_id: str
    processed_utc: str
    present: bool


class ScanState:
    """The SQLite state file of a scan (see the module docstring).

    Parameters
    ----------
    path:
        The ``.sqlite`` file; created (with its folder) when absent.

    Raises
    ------
    UsageError
        When the file is not a recnec state database, or was written by a newer schema.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            got = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if got is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(got[0]) > SCHEMA_VERSION:
                raise UsageError(f"state file {self.path} has schema {got[0]}, newer than this recnec "
                                 f"understands ({SCHEMA_VERSION}); upgrade recnec")
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"state file {self.path} is not a recnec state database ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ScanState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- studies -----------------------------------------------------------------------------
    def get(self, study_id: str) -> StoredStudy | None:
        """The stored study, or ``None`` when never seen."""
        cur = self._db.execute("SELECT study_id, fingerprint, status, row, run_id, processed_utc, present "
                               "FROM studies WHERE study_id=?", (study_id,))
        got = cur.fetchone()
        return None if got is None else _stored(got)

    def all(self) -> list[StoredStudy]:
        """Every stored study, sorted by study id."""
        cur = self._db.execute("SELECT study_id, fingerprint, status, row, run_id, processed_utc, present "
                               "FROM studies ORDER BY study_id")
        return [_stored(r) for r in cur.fetchall()]

    def put(self, study_id: str, *, fingerprint: str | None, status: str, row: Mapping[str, Any], run_id: str,
            processed_utc: str) -> None:
        """Insert or replace one study's result in one committed transaction."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO studies (study_id, fingerprint, status, row, run_id, processed_utc, present,"
                " last_seen_run)"
                " VALUES (?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT(study_id) DO UPDATE SET fingerprint=excluded.fingerprint,"
                " status=excluded.status, row=excluded.row, run_id=excluded.run_id,"
                " processed_utc=excluded.processed_utc, present=1, last_seen_run=excluded.last_seen_run",
                (study_id, fingerprint, status, json.dumps(dict(row), default=str), run_id, processed_utc, run_id))

    def mark_presence(self, present_ids: Iterable[str], run_id: str) -> int:
        """Mark the studies in ``present_ids`` present (seen by ``run_id``) and every other one absent.

        Returns the number of stored studies no longer present in the tree (their rows are kept).
        """
        ids = list(present_ids)
        with self._transaction():
            self._db.execute("UPDATE studies SET present=0")
            self._db.executemany("UPDATE studies SET present=1, last_seen_run=? WHERE study_id=?",
                                 [(run_id, i) for i in ids])
            return int(self._db.execute("SELECT COUNT(*) FROM studies WHERE present=0").fetchone()[0])

    # ---- runs --------------------------------------------------------------------------------
    def start_run(self, run_id: str, *, started_utc: str, input_root: str, report: str) -> None:
        with self._transaction():
            self._db.execute("INSERT INTO runs (run_id, started_utc, input_root, report) VALUES (?, ?, ?, ?)",
                             (run_id, started_utc, input_root, report))

    def finish_run(self, run_id: str, *, finished_utc: str, summary: Mapping[str, Any], exit_code: int,
                   stop_reason: str = "") -> None:
        with self._transaction():
            self._db.execute("UPDATE runs SET finished_utc=?, summary=?, exit_code=?, stop_reason=? WHERE run_id=?",
                             (finished_utc, json.dumps(dict(summary)), exit_code, stop_reason or None, run_id))

    def runs(self, limit: int = 10) -> list[dict[str, Any]]:
        """The last ``limit`` runs, newest first (``summary`` parsed; ``None`` for unfinished runs)."""
        cur = self._db.execute("SELECT run_id, started_utc, finished_utc, input_root, report, summary, exit_code,"
                               " stop_reason FROM runs ORDER BY started_utc DESC, rowid DESC LIMIT ?", (limit,))
        keys = ("run_id", "started_utc", "finished_utc", "input_root", "report", "summary", "exit_code",
                "stop_reason")
        out = []
        for r in cur.fetchall():
            d = dict(zip(keys, r))
            d["summary"] = json.loads(d["summary"]) if d["summary"] else None
            out.append(d)
        return out

    # ---- discovery cache ---------------------------------------------------------------------
    def cached_discovery(self, input_root: str, listing_sha256: str, recnec_version: str) -> list[Any] | None:
        """The studies discovered last time under ``input_root`` if the tree's stat listing is
        unchanged (same ``listing_sha256``) and the same recnec version discovered them."""
        got = self._db.execute("SELECT listing_sha256, studies, recnec_version FROM discovery WHERE input_root=?",
                               (input_root,)).fetchone()
        if got is None or got[0] != listing_sha256 or got[2] != recnec_version:
            return None
        try:
            # our own file, written by store_discovery below (frozen dataclasses of recnec_cli.study)
            return list(pickle.loads(got[1]))
        except Exception:  # noqa: BLE001 - an unreadable cache is only a cache miss
            return None

    def store_discovery(self, input_root: str, listing_sha256: str, studies: Sequence[Any],
                        recnec_version: str) -> None:
        blob = pickle.dumps(list(studies), protocol=pickle.HIGHEST_PROTOCOL)
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO discovery VALUES (?, ?, ?, ?)",
                             (input_root, listing_sha256, blob, recnec_version))

    # ---- DICOM objects and sends -------------------------------------------------------------
    def objects_of(self, study_id: str) -> dict[str, dict[str, str]]:
        """kind -> ``{sop_class_uid, sop_instance_uid, path, digest, written_utc}`` of one study."""
        cur = self._db.execute("SELECT kind, sop_class_uid, sop_instance_uid, path, digest, written_utc "
                               "FROM dicom_objects WHERE study_id=?", (study_id,))
        return {r[0]: dict(zip(("sop_class_uid", "sop_instance_uid", "path", "digest", "written_utc"), r[1:]))
                for r in cur.fetchall()}

    def record_objects(self, study_id: str, objects: Sequence[Any], *, written_utc: str,
                       destination: str = "") -> None:
        """Make ``objects`` (:class:`recnec_cli.pacs.objects.WrittenObject`) the study's current
        ones (kinds not among them are dropped) and, with ``destination``, queue each one not yet
        sent there (``pending``)."""
        with self._transaction():
            self._db.execute("DELETE FROM dicom_objects WHERE study_id=?", (study_id,))
            for o in objects:
                self._db.execute("INSERT INTO dicom_objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (study_id, o.kind, o.sop_class_uid, o.sop_instance_uid, str(o.path), o.digest,
                                  written_utc))
                if destination:
                    self._db.execute("INSERT OR IGNORE INTO sends (destination, sop_instance_uid, study_id, kind, "
                                     "status) VALUES (?, ?, ?, ?, 'pending')",
                                     (destination, o.sop_instance_uid, study_id, o.kind))

    def unsent(self, destination: str) -> list[dict[str, str]]:
        """The current objects not yet ``sent`` to ``destination`` (pending, failed or never queued),
        as ``{study_id, kind, sop_instance_uid, path}``, oldest study first."""
        cur = self._db.execute(
            "SELECT o.study_id, o.kind, o.sop_instance_uid, o.path FROM dicom_objects o "
            "LEFT JOIN sends s ON s.destination=? AND s.sop_instance_uid=o.sop_instance_uid "
            "WHERE s.status IS NULL OR s.status != 'sent' ORDER BY o.written_utc, o.study_id, o.kind",
            (destination,))
        return [dict(zip(("study_id", "kind", "sop_instance_uid", "path"), r)) for r in cur.fetchall()]

    def record_send(self, destination: str, obj: Mapping[str, str], *, ok: bool, message: str,
                    when_utc: str) -> None:
        """The outcome of one C-STORE attempt of ``obj`` (a row of :meth:`unsent`)."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO sends VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (destination, sop_instance_uid) "
                "DO UPDATE SET status=excluded.status, attempts=attempts+1, last_utc=excluded.last_utc, "
                "message=excluded.message",
                (destination, obj["sop_instance_uid"], obj["study_id"], obj["kind"], "sent" if ok else "failed",
                 when_utc, message))

    def send_status(self) -> dict[str, dict[str, str]]:
        """study_id -> destination -> ``sent``, ``pending`` or ``failed: <reason>``: the worst of
        the study's current objects (failed over pending over sent)."""
        cur = self._db.execute(
            "SELECT s.study_id, s.destination, s.status, s.message FROM sends s JOIN dicom_objects o "
            "ON o.study_id=s.study_id AND o.sop_instance_uid=s.sop_instance_uid")
        rank = {"sent": 0, "pending": 1, "failed": 2}
        out: dict[str, dict[str, str]] = {}
        for study_id, dest, status, message in cur.fetchall():
            text = f"failed: {message}" if status == "failed" else status
            have = out.setdefault(study_id, {}).get(dest)
            if have is None or rank[status] > rank[have.split(":")[0]]:
                out[study_id][dest] = text
        return out

    def send_counts(self) -> list[dict[str, Any]]:
        """Per destination and status: how many current objects, and the last attempt (UTC)."""
        cur = self._db.execute(
            "SELECT s.destination, s.status, COUNT(*), MAX(s.last_utc) FROM sends s JOIN dicom_objects o "
            "ON o.study_id=s.study_id AND o.sop_instance_uid=s.sop_instance_uid "
            "GROUP BY s.destination, s.status ORDER BY s.destination, s.status")
        return [dict(zip(("destination", "status", "objects", "last_attempt_utc"), r)) for r in cur.fetchall()]

    # ---- the patient's timeline --------------------------------------------------------------
    def record_timeline(self, studies: Iterable[Any]) -> None:
        """Remember each discovered study's patient pseudonym, acquisition date-time and session
        (:class:`recnec_cli.study.Study` ``patient_pseudonym``, ``acquired``, ``session``)."""
        rows = [(s.study_id, s.patient_pseudonym, getattr(s, "acquired", ""), getattr(s, "session", ""))
                for s in studies]
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO timeline VALUES (?, ?, ?, ?)", rows)

    def timeline(self) -> dict[str, tuple[str, str, str]]:
        """study_id -> (patient pseudonym, acquired, session) for every study discovery has seen."""
        cur = self._db.execute("SELECT study_id, patient, acquired, session FROM timeline")
        return {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}

    def put_follow_up_map(self, study_id: str, data: bytes | None) -> None:
        """Store (or, with ``None``, drop) a study's follow-up map bytes."""
        with self._transaction():
            if data is None:
                self._db.execute("DELETE FROM follow_up_maps WHERE study_id=?", (study_id,))
            else:
                self._db.execute("INSERT OR REPLACE INTO follow_up_maps VALUES (?, ?, ?)",
                                 (study_id, hashlib.sha256(data).hexdigest()[:16], data))

    def follow_up_map(self, study_id: str) -> bytes | None:
        got = self._db.execute("SELECT data FROM follow_up_maps WHERE study_id=?", (study_id,)).fetchone()
        return None if got is None else bytes(got[0])

    def map_digests(self) -> dict[str, str]:
        """study_id -> digest of its follow-up map."""
        return {r[0]: r[1] for r in self._db.execute("SELECT study_id, digest FROM follow_up_maps").fetchall()}

    def lesion_match(self, study_id: str, ref_study_id: str, digests: str) -> tuple[str, float | None, str] | None:
        """(status, overlap, note) of a pair computed from maps with ``digests``, or ``None``."""
        got = self._db.execute("SELECT status, overlap, note FROM lesion_matches WHERE study_id=? AND ref_study_id=? "
                               "AND digests=?", (study_id, ref_study_id, digests)).fetchone()
        return None if got is None else (got[0], got[1], got[2])

    def record_lesion_match(self, study_id: str, ref_study_id: str, digests: str, status: str,
                            overlap: float | None, note: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO lesion_matches VALUES (?, ?, ?, ?, ?, ?)",
                             (study_id, ref_study_id, digests, status, overlap, note))

    # ---- helpers -----------------------------------------------------------------------------
    def _transaction(self):
        return _Tx(self._db)


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _stored(r: Sequence[Any]) -> StoredStudy:
    return StoredStudy(study_id=r[0], fingerprint=r[1], status=r[2], row=json.loads(r[3]), run_id=r[4],
                       processed_utc=r[5], present=bool(r[6]))


def digest(parts: Iterable[Any]) -> str:
    """Hex SHA-256 of a sequence of JSON-serialisable parts (order matters)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def iter_status_counts(studies: Iterable[StoredStudy]) -> Iterator[tuple[str, int]]:
    """``(status, count)`` over studies still present, most frequent first."""
    counts: dict[str, int] = {}
    for s in studies:
        if s.present:
            counts[s.status] = counts.get(s.status, 0) + 1
    yield from sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
