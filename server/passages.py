"""The passages a server finds in prompts: from an index, from its block store, and ingested through it.

A block holds its passage's token ids, so a store is its own list of passages: every block
encoded after the engine's prompt head is decoded back to text and known under its store key.
Replicas over one store learn each other's passages by scanning it again for new keys.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence

from blockrag.engine import Block, BlockEngine, context_id
from blockrag.integrations import Passage, PassageIndex, PromptRunner
from blockrag.kvstore import StoreError, key_fingerprint

log = logging.getLogger(__name__)

SCAN_BATCH = 256
"""Blocks read from the store per request while scanning it."""


def engine_context(engine: BlockEngine) -> str:
    """The context id of the blocks this engine serves in prompts (its prompt head, or none for naive blocks)."""
    past = engine.passage_context().block
    return context_id(past.token_ids) if past is not None else ""


def block_passage(engine: BlockEngine, key: str, block: Block) -> Passage | None:
    """The passage ``block`` holds, known as ``key``; ``None`` if the engine cannot serve it in a prompt.

    That is a block encoded after another head, one that does not end with the engine's passage
    separator, or one whose decoded text tokenizes to other ids.
    """
    ids, separator = block.token_ids.tolist(), engine.separator_ids
    if block.context != engine_context(engine) or len(ids) <= len(separator) or ids[-len(separator):] != separator:
        return None
    text = engine.tokenizer.decode(ids[:-len(separator)])
    return Passage(text, key) if engine.passage_token_ids(text, exact_text=True) == ids else None


def _is_key_of(name: str, fingerprint: str) -> bool:
    """Whether ``name`` is a block key of the model ``fingerprint`` (other names are never looked up in the store)."""
    try:
        return key_fingerprint(name) == fingerprint
    except ValueError:
        return False


class KnownPassages:
    """The runner's passages, added to while requests are answered.

    The index a request searches is replaced whole, never changed in place, so a search never
    sees a half-added batch.
    """

    def __init__(self, runner: PromptRunner, passages: Iterable[Passage] = ()):
        self.runner = runner
        self._passages: list[Passage] = []
        self._texts: set[str] = set()
        self._seen_keys: set[str] = set()
        self._lock = threading.Lock()
        self.add(passages)

    def __len__(self) -> int:
        return len(self._passages)

    def add(self, passages: Iterable[Passage]) -> list[Passage]:
        """Add passages whose text is new; returns those added."""
        with self._lock:
            new = [p for p in passages if p.text and p.text not in self._texts]
            if new:
                self._texts.update(p.text for p in new)
                self._passages += new
                self.runner.passages = PassageIndex(self._passages)
            return new

    def resolve(self, ids: Sequence[str]) -> tuple[list[Passage], list[str]]:
        """The passages for explicit ids, and the ids found nowhere.

        Ids the server does not know are looked up as block keys in the store, so a replica serves
        a passage another replica ingested as soon as its block is stored.
        """
        found = dict(zip(ids, self.runner.passages.get(ids)))
        missing = [i for i in dict.fromkeys(ids) if found[i] is None]
        keys = [i for i in missing if _is_key_of(i, self.runner.engine.fingerprint)]
        for passage in self.scan(keys) if keys else ():
            found[passage.id] = passage  # type: ignore[index]
        return [p for p in found.values() if p is not None], [i for i in missing if found[i] is None]

    def scan(self, keys: Iterable[str] | None = None) -> list[Passage]:
        """Learn the passages of the store's blocks under ``keys`` (every key not seen before when ``None``)."""
        store, engine = self.runner.engine.store, self.runner.engine
        if store is None:
            return []
        try:
            wanted = [k for k in store.keys() if k not in self._seen_keys] if keys is None else list(keys)
            passages = []
            for at in range(0, len(wanted), SCAN_BATCH):
                batch = wanted[at:at + SCAN_BATCH]
                passages += [p for key, block in zip(batch, store.get_many(batch)) if block is not None
                             and (p := block_passage(engine, key, block)) is not None]
                self._seen_keys.update(batch)
        except StoreError as exc:  # the store went away: the passages are learnt at the next scan
            log.warning("could not read passages from the block store: %s", exc)
            return []
        self.add(passages)
        return passages


class StoreScanner:
    """Scans the store for new passages every ``interval_s`` seconds on a daemon thread."""

    def __init__(self, known: KnownPassages, interval_s: float):
        self.known = known
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blockrag-store-scan", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.known.scan()
