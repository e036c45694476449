"""A disk that fills up during ingestion: a specific error, nothing committed lost, the same run resumable."""

from __future__ import annotations

import errno
import os
import random
import shutil
import sqlite3

import diskcache
import faiss
import pytest

import blockrag.retriever.index as index_module
from blockrag.kvstore import StoreFullError
from blockrag.retriever import Index, IndexFullError
from reliability_support import check_index, corpus, ingest_tiny, node_keys

pytestmark = pytest.mark.reliability


def _entry_files_fill_up(monkeypatch, rng, calls):
    """The disk fills during a seeded entry file write: part of it lands, then ENOSPC."""
    limit = rng.randrange(calls["entry files"])
    real = diskcache.Disk._write
    count = {"writes": 0}

    def write(self, full_path, iterator, mode, encoding=None):
        count["writes"] += 1
        if count["writes"] > limit:
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            with open(full_path, mode) as partial:
                partial.write(b"the first bytes of an entry")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, full_path, iterator, mode, encoding)

    monkeypatch.setattr(diskcache.Disk, "_write", write)
    return StoreFullError


class _FillingConnection(sqlite3.Connection):
    """A document store connection whose disk fills during a seeded transaction: SQLite's own SQLITE_FULL,
    from a page limit at the current size and a row that needs more, so the whole transaction rolls back."""

    fail_at = 0
    calls = 0

    def executemany(self, sql, rows):
        cursor = super().executemany(sql, rows)
        type(self).calls += 1
        if type(self).calls == type(self).fail_at:
            pages = super().execute("PRAGMA page_count").fetchone()[0]
            super().execute(f"PRAGMA max_page_count = {pages}")
            super().execute("INSERT INTO documents VALUES ('filler', zeroblob(1000000))")
        return cursor


def _docstore_fills_up(monkeypatch, rng, calls):
    _FillingConnection.calls, _FillingConnection.fail_at = 0, rng.randint(1, calls["docstore transactions"])
    connect = sqlite3.connect

    def connecting(path, *args, **kwargs):  # the document store's connections only, not diskcache's
        if str(path).endswith("docstore.sqlite"):
            kwargs["factory"] = _FillingConnection
        return connect(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connecting)
    return IndexFullError


def _faiss_file_fills_up(monkeypatch, rng, calls):
    """FAISS's report of a short write, after part of the file landed."""
    def write_index(vectors, path):
        with open(path, "wb") as partial:
            partial.write(b"\0" * 4096)
        raise RuntimeError(f"Error in faiss::write_index: write error in {path}: 4096 != 65536 "
                           f"({os.strerror(errno.ENOSPC)})")

    monkeypatch.setattr(index_module.faiss, "write_index", write_index)
    return IndexFullError


def _count_calls(monkeypatch, run) -> dict[str, int]:
    """How many entry files and batched document-store writes an uninterrupted ``run()`` makes."""
    calls = {"entry files": 0, "docstore transactions": 0}
    write = diskcache.Disk._write

    def counting_write(*args, **kwargs):
        calls["entry files"] += 1
        return write(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(diskcache.Disk, "_write", counting_write)
        _docstore_fills_up(patch, random.Random(0), {"docstore transactions": 1})
        _FillingConnection.fail_at = -1
        run()
        calls["docstore transactions"] = _FillingConnection.calls
    return calls


FAULTS = {"entry file": _entry_files_fill_up, "document store": _docstore_fills_up, "FAISS file": _faiss_file_fills_up}


@pytest.mark.parametrize("where", FAULTS)
def test_a_full_disk_raises_a_specific_error_loses_nothing_and_the_run_resumes(tmp_path, engine, figures, long_mode,
                                                                                monkeypatch, where):
    """Protects: ENOSPC and SQLITE_FULL become ``StoreFullError`` (KV entries) or ``IndexFullError`` (document
    store, FAISS file) instead of a raw OSError/sqlite3/RuntimeError; SQLite rolls back the batch it could not
    commit, a cut entry file or FAISS draft is removed, passages are committed only after their KV is stored,
    and the re-run plans its work from what the index and store hold.

    An index is updated to a new version of its documents while the disk fills at a seeded point; afterwards
    every passage listed is served intact (the unchanged documents' passages all still listed), no partial
    file is left, and once space is back the same call completes to the index an uninterrupted run builds.
    """
    trials = 8 if long_mode else 2
    base = tmp_path / "base"
    ingest_tiny(corpus(11, version=1), base, engine)
    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    calls = _count_calls(monkeypatch, lambda: ingest_tiny(corpus(11, version=2), clean, engine))
    assert calls["entry files"] > 4 and calls["docstore transactions"] > 2
    expected, unchanged = node_keys(clean), node_keys(base) & node_keys(clean)
    rng = random.Random(f"disk full {where}")
    for trial in range(trials):
        folder = tmp_path / f"trial-{trial}"
        shutil.copytree(base, folder)
        with monkeypatch.context() as patch:
            error = FAULTS[where](patch, rng, calls)
            with pytest.raises(error, match="is full .*(no stored block was lost|Nothing already committed)"):
                ingest_tiny(corpus(11, version=2), folder, engine)
        verdict = check_index(folder, engine)
        leftovers = [p.name for p in folder.rglob(".*") if p.is_file()]
        held = node_keys(folder)
        ingest_tiny(corpus(11, version=2), folder, engine)
        resumed = check_index(folder, engine)
        lost = len(unchanged - held) + verdict.lost
        ok = not verdict.problems and not resumed.problems and not leftovers and node_keys(folder) == expected
        figures.fault(f"disk full: {where}", ok, lost)
        assert verdict.problems == [] and resumed.problems == []
        assert unchanged <= held and leftovers == []
        assert node_keys(folder) == expected
