"""The LoRA adapter folder: the one module that reads and writes its files.

An adapter folder holds peft's weights (safetensors) and config, and blockrag's JSON record of how
it was trained: the base model's fingerprint and dtype (an adapter is refused on any other base),
the training settings (the passage order among them), and which rows of which QA file it was
trained on, so that an evaluation can refuse to score them. The engine reads adapters
(``load_model(..., adapter=...)`` merges one into a plain model); training writes them through
:func:`save_adapter`, so the format has this one home.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blockrag.errors import AdapterNotFoundError, AdapterMismatchError, InvalidArgumentError, MissingExtraError
from .prompt import PASSAGE_ORDERS, PassageOrder

if TYPE_CHECKING:  # transformers' and peft's model classes load slowly; only their names are needed here
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

#: Files of a LoRA adapter folder: peft's weights and config, and blockrag's record of how it was trained.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SETTINGS = "blockrag_finetune.json"
#: Version of the record: 2 added ``trained_on``; older records are read alike, without it.
RECORD_FORMAT = 2
#: The passage order of an adapter whose folder records none (no record, or a record without ``passage_order``):
#: such adapters come from before the order was recorded, when `blockrag finetune` placed passages best first.
UNRECORDED_PASSAGE_ORDER: PassageOrder = "best-first"


@dataclass(frozen=True)
class TrainingRows:
    """Rows of one QA file an adapter was trained on: the file's sha256 names it, whatever its path now."""

    sha256: str
    """sha256 of the file's bytes, as :func:`file_sha256` computes it."""
    rows: tuple[int, ...]
    """Line numbers from 0, ascending, each once."""
    path: str | None = None
    """Where the file was when training read it (for messages only)."""

    def __post_init__(self) -> None:
        rows = tuple(sorted(set(self.rows)))
        if rows and rows[0] < 0:
            raise InvalidArgumentError(f"row numbers count lines from 0, got {rows[0]}")
        object.__setattr__(self, "rows", rows)

    def merged(self, other: "TrainingRows") -> "TrainingRows":
        """Both sets of rows of the same file (a resumed adapter was trained on its own rows too)."""
        if other.sha256 != self.sha256:
            raise InvalidArgumentError("rows of different files cannot be merged; keep them as separate entries")
        return TrainingRows(self.sha256, self.rows + other.rows, self.path or other.path)

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "path": self.path, "count": len(self.rows), "ranges": row_ranges(self.rows)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainingRows":
        return cls(data["sha256"], tuple(r for first, last in data["ranges"] for r in range(first, last + 1)),
                   data.get("path"))


def row_ranges(rows: Iterable[int]) -> list[list[int]]:
    """Ascending rows as ``[first, last]`` runs (both included): a record stays short for any number of rows."""
    out: list[list[int]] = []
    for row in sorted(set(rows)):
        if out and row == out[-1][1] + 1:
            out[-1][1] = row
        else:
            out.append([row, row])
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: what names a QA file in an adapter's record and an evaluation's settings."""
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def adapter_record(adapter: str | os.PathLike) -> dict[str, Any] | None:
    """The adapter's JSON record of how it was trained, None if its folder has none."""
    path = Path(adapter).expanduser() / ADAPTER_SETTINGS
    return json.loads(path.read_text()) if path.is_file() else None


def adapter_passage_order(adapter: str | os.PathLike) -> PassageOrder:
    """The passage order an adapter was trained with; :data:`UNRECORDED_PASSAGE_ORDER` where none is recorded."""
    record = adapter_record(adapter)
    order = (record or {}).get("settings", {}).get("passage_order", UNRECORDED_PASSAGE_ORDER)
    if order not in PASSAGE_ORDERS:
        raise AdapterMismatchError(f"{Path(adapter).expanduser() / ADAPTER_SETTINGS} records the passage order "
                                   f"{order!r}, none of {PASSAGE_ORDERS}; retrain the adapter with this blockrag.")
    return order


def adapter_training_rows(adapter: str | os.PathLike) -> list[TrainingRows] | None:
    """The QA rows an adapter was trained on, one entry per file; None if its record does not say (older ones)."""
    record = adapter_record(adapter)
    if record is None or "trained_on" not in record:
        return None
    return [TrainingRows.from_json(entry) for entry in record["trained_on"]]


def lora_shape(adapter: str | os.PathLike) -> dict[str, Any]:
    """The LoRA settings an adapter folder was saved with: ``rank``, ``alpha``, ``dropout``, ``target_modules``."""
    path = Path(adapter).expanduser() / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterNotFoundError(f"{path.parent} holds no LoRA adapter ({ADAPTER_CONFIG}); pass the folder "
                                   "`blockrag finetune --out` wrote.")
    config = json.loads(path.read_text())
    return {"rank": config["r"], "alpha": config["lora_alpha"], "dropout": config["lora_dropout"],
            "target_modules": tuple(sorted(config["target_modules"]))}


def check_adapter(adapter: str | os.PathLike, fingerprint: str, dtype: torch.dtype) -> Path:
    """The adapter folder, once it holds an adapter recorded as trained on the model ``fingerprint`` (in ``dtype``)."""
    folder = Path(adapter).expanduser()
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise AdapterNotFoundError(f"{folder} holds no LoRA adapter ({ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}); pass "
                                   "the folder `blockrag finetune --out` wrote.")
    trained = adapter_record(folder)
    if trained is None:
        log.warning("%s has no %s: cannot check that the adapter was trained on this base model", folder,
                    ADAPTER_SETTINGS)
        return folder
    base, base_dtype = trained.get("base_fingerprint"), trained.get("base_dtype")
    if base != fingerprint:
        raise AdapterMismatchError(
            f"the adapter in {folder} was trained on a base model with fingerprint {base} ({base_dtype}), but "
            f"this model's is {fingerprint} ({dtype}); load the model the adapter was trained on, in that dtype "
            f"(see 'base_model' in {folder / ADAPTER_SETTINGS}).")
    return folder


def merge_adapter(model: PreTrainedModel, fingerprint: str,
                  adapter: str | os.PathLike) -> tuple[PreTrainedModel, str]:
    """Merge a LoRA adapter into ``model`` (fingerprint ``fingerprint``): a plain model, so the engine needs no peft.

    Returns the merged model and its fingerprint, which names the adapter's weights too. An
    adapter recorded as trained on another base model is refused.
    """
    folder = check_adapter(adapter, fingerprint, next(model.parameters()).dtype)
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise MissingExtraError("applying an adapter", "finetune", exc) from exc
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload().eval()
    h = hashlib.sha256(fingerprint.encode())
    h.update((folder / ADAPTER_CONFIG).read_bytes())
    h.update((folder / ADAPTER_WEIGHTS).read_bytes())
    return merged, h.hexdigest()[:24]


def merge_training_rows(*entries: Sequence[TrainingRows] | None) -> list[TrainingRows]:
    """Entries of several records as one list, rows of the same file merged (in first-seen order of files)."""
    by_file: dict[str, TrainingRows] = {}
    for entry in entries:
        for rows in entry or ():
            by_file[rows.sha256] = by_file[rows.sha256].merged(rows) if rows.sha256 in by_file else rows
    return list(by_file.values())


def save_adapter(model: PeftModel, folder: str | os.PathLike, record: dict[str, Any],
                 trained_on: Sequence[TrainingRows] | None) -> Path:
    """Write a peft model's LoRA weights (safetensors) and config into ``folder``, and blockrag's ``record``.

    ``record`` holds what :func:`check_adapter` and :func:`adapter_passage_order` read back
    (``base_fingerprint``, ``base_dtype``, ``settings`` with ``passage_order``) and anything else
    worth keeping; ``trained_on`` the QA rows trained on (None: unknown, e.g. examples built by hand).
    """
    for key in ("base_fingerprint", "base_dtype", "settings"):
        if key not in record:
            raise InvalidArgumentError(f"an adapter record needs {key!r}: loading the adapter checks it")
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    full = {"format": RECORD_FORMAT, **record}
    if trained_on is not None:
        full["trained_on"] = [rows.to_json() for rows in trained_on]
    (out / ADAPTER_SETTINGS).write_text(json.dumps(full, indent=1) + "\n")
    return out
