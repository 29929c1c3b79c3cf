"""Exception types. Each also subclasses the matching builtin, so callers can catch either."""

from __future__ import annotations

import enum


class ShardkitError(Exception):
    """Base class of every error shardkit raises on purpose."""


class SourceError(ShardkitError, ValueError):
    """A source file or folder cannot be packed (corrupt, unreadable, wrong type, ...)."""

    def __init__(self, path, reason: str | None = None):
        if reason is None:  # re-created from its message (e.g. by DataLoader in the main process)
            super().__init__(str(path))
            self.path, _, self.reason = str(path).partition(": ")
            return
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DestinationError(ShardkitError, FileExistsError):
    """The destination holds something that packing must not overwrite."""


class WriteError(ShardkitError, OSError):
    """Writing the destination failed (disk full, read-only, gone); names the destination."""

    def __init__(self, dest, reason: str | None = None):
        if reason is None:
            super().__init__(str(dest))
            self.dest, self.reason = str(dest), str(dest)
            return
        self.dest, self.reason = str(dest), reason
        super().__init__(f"{self.dest}: {reason}")


class ManifestError(ShardkitError, ValueError):
    """A manifest is missing, malformed, or from an unsupported format version."""


class ShardError(ShardkitError, IOError):
    """A shard cannot be read as the manifest describes it (names the shard URL and sample key).

    ``gave_up`` is True when a store gave up on a read that kept failing (retries or the timeout
    ran out): what comes after it in the same file is not worth trying again."""

    gave_up = False

    def __init__(self, url, reason: str | None = None, key=None):
        if reason is None:  # re-created from its message (e.g. by DataLoader in the main process)
            super().__init__(str(url))
            self.url, self.key, self.reason = str(url), key, str(url)
            return
        self.url = str(url)
        self.key = key
        self.reason = reason
        where = self.url if key is None else f"{self.url} (sample {key!r})"
        super().__init__(f"{where}: {reason}")


class DecodeError(ShardError):
    """A sample's image or array cannot be decoded."""


class OnError(str, enum.Enum):
    """What a bad sample or shard does (``on_error=``): ``"raise"`` stops with an error naming
    it; ``"skip"`` leaves it out (reading: replaced by a good sample, so every rank still yields
    as many), counts it and reports it. Code bugs (``TypeError`` and the like) are never skipped.
    A ``str`` enum: ``OnError.SKIP == "skip"``."""

    RAISE = "raise"
    SKIP = "skip"

    @classmethod
    def of(cls, value: str | OnError) -> OnError:
        """The policy ``value`` names; ValueError naming the argument otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {value!r}") from None

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def raises(self) -> bool:
        return self is OnError.RAISE
