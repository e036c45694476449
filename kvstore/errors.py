"""Exception classes of the block store. Every message says what the user can do about it."""

from blockrag.engine import BlockragError


class StoreError(BlockragError):
    """Base class of the errors a block store raises on purpose."""


class StoreFullError(StoreError):
    """The store's disk or server memory is full; the entry was not written and no existing entry was lost."""


class WrongModelError(StoreError):
    """The store holds blocks of another model than the one asking: each store serves one model."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached."""


class CorruptEntryError(StoreError):
    """A stored entry failed its header, checksum or key check. Stores delete such entries and report a miss."""
