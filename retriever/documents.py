"""Documents to ingest: the dataclass, loaders for text, Markdown and JSONL files, and the bundled corpus."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from blockrag.errors import DocumentFormatError

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")


@dataclass(frozen=True)
class Document:
    """A text to index. ``id`` names it across runs: ingesting the same ID again replaces it."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return None


def _not_text(where: str, exc: UnicodeDecodeError) -> DocumentFormatError:
    return DocumentFormatError(f"{where} is not UTF-8 text (byte {exc.start}: {exc.reason}): a binary file, or text "
                               "in another encoding. Leave binary files out of the input, or convert text to UTF-8.")


def _text_document(path: Path, doc_id: str) -> Document:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_text(str(path), exc) from None
    metadata: dict[str, Any] = {"source": str(path)}
    title = _markdown_title(text) if path.suffix == ".md" else None
    if title:
        metadata["title"] = title
    return Document(doc_id, text, metadata)


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_text(f"{path}:{number}", exc) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DocumentFormatError(f"{path}:{number} is not valid JSON ({exc.msg}); each line of a .jsonl "
                                          'input must be an object like {"id": ..., "text": ..., "metadata": {...}}.')
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DocumentFormatError(f'{path}:{number} has no string field "text"; each line of a .jsonl input '
                                          'must be an object like {"id": ..., "text": ..., "metadata": {...}}.')
            metadata = row.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise DocumentFormatError(f'{path}:{number}: "metadata" must be a JSON object.')
            yield Document(str(row.get("id") or f"{path.name}:{number}"), row["text"], metadata)


def _read(path: Path, doc_id: str) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif path.suffix in TEXT_SUFFIXES:
        yield _text_document(path, doc_id)
    else:
        raise DocumentFormatError(f"cannot read {path}: blockrag ingests {', '.join(SUFFIXES)} files.")


def load_documents(paths: Iterable[str | os.PathLike]) -> list[Document]:
    """Documents from files and folders (searched recursively for .txt, .md and .jsonl files).

    A file's document ID is its name when given directly, and its path relative to the folder
    when found in one, so IDs do not depend on the working directory. JSONL lines carry their
    own ``id`` (default ``FILE:LINE``), ``text`` and ``metadata``.
    """
    documents: list[Document] = []
    for given in map(Path, paths):
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
                documents.extend(_read(path, path.relative_to(given).as_posix()))
        elif given.is_file():
            documents.extend(_read(given, given.name))
        else:
            raise DocumentFormatError(f"{given} does not exist.")
    return documents


def bundled_corpus() -> list[Document]:
    """The small corpus written for blockrag's demo and tests: made-up places and things, so the
    answers cannot come from a model's memory. IDs are the file stems."""
    folder = files("blockrag.retriever") / "corpus"
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".md"):
            text = entry.read_text(encoding="utf-8")
            out.append(Document(entry.name.removesuffix(".md"), text,
                                {"source": f"blockrag corpus/{entry.name}", "title": _markdown_title(text)}))
    return out


@dataclass(frozen=True)
class SampleQuestion:
    """A question about the bundled corpus, the document that answers it and the answer's words."""

    question: str
    document: str
    answer: str


def bundled_questions() -> list[SampleQuestion]:
    """Questions each answered by one passage of :func:`bundled_corpus`."""
    rows = json.loads((files("blockrag.retriever") / "corpus" / "questions.json").read_text(encoding="utf-8"))
    return [SampleQuestion(**row) for row in rows]
