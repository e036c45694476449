"""A separate ingestion process for test_kill: ``ingest_child.py INDEX DOCS.jsonl TOKENIZER_DIR KILL_AT``.

Ingests the JSONL file with the tiny engine and sends itself SIGKILL at write event ``KILL_AT`` (1 is
the first): before and after every document-store transaction, FAISS save and rename, and in the
middle of every entry file diskcache writes. With ``KILL_AT`` 0 it runs to the end and prints the
number of events as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

import diskcache  # noqa: E402
import torch  # noqa: E402

import blockrag.retriever.index as index_module  # noqa: E402
from blockrag.retriever import Index, load_documents  # noqa: E402
from reliability_support import ingest_tiny, tiny_engine  # noqa: E402

events = 0


def event() -> None:
    global events
    events += 1
    if events == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def around(owner, name: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        event()
        result = original(*args, **kwargs)
        event()
        return result

    setattr(owner, name, wrapped)


def halfway(self, full_path, iterator, mode, encoding=None):
    def chunks():
        for chunk in iterator:
            yield chunk[:len(chunk) // 2]
            event()
            yield chunk[len(chunk) // 2:]
    return write_file(self, full_path, chunks(), mode, encoding)


if __name__ == "__main__":
    index_dir, docs, tokenizer_dir, KILL_AT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    engine = tiny_engine(tokenizer_dir)
    for name in ("set_documents", "add", "remove_nodes", "record_digests", "save"):
        around(Index, name)
    around(index_module, "_replace")
    around(index_module.os, "replace")
    write_file = diskcache.Disk._write
    diskcache.Disk._write = halfway
    around(diskcache.Cache, "set")
    ingest_tiny(load_documents([docs]), Path(index_dir), engine)
    print(json.dumps({"events": events}))
