"""What ``on_error="skip"`` cost an epoch: bad samples and bad shards, seen from the main process.

DataLoader workers read the shards, but the user asks the dataset in the main process
(``ds.skipped``, ``ds.bad_shards``). :class:`SkipLog` lives in shared memory made with the
dataset (no I/O), so every process of a rank writes into the same table: each writer (the
DataLoader worker with that id, or the main process) into a region of its own, so no two
processes ever write the same bytes and no lock is needed. A region is tagged with the
iteration it belongs to (epoch and generation, see :class:`shardkit.state.EpochState`);
readers merge the regions of the current iteration.
"""

from __future__ import annotations

import numpy as np
import torch

REGIONS = 64  # writers (worker ids modulo this); more workers share regions (counts may then race)
ENTRIES = 24  # bad shards each writer lists per iteration; more are counted, not listed
TEXT = 200  # bytes of a bad shard's reason
_HEAD = 4  # tag, samples skipped, shards listed, shards not listed (over ENTRIES)
_ENTRY = 4  # shard number, first sample lost, samples lost, reason length
KNOWN, NEW, UNLISTED = 0, 1, 2  # what Region.shard says of a bad shard


class SkipLog:
    """Bad samples and bad shards of the current iteration of one rank (see the module doc)."""

    def __init__(self):
        self._ints = torch.zeros(REGIONS, _HEAD + ENTRIES * _ENTRY, dtype=torch.int64).share_memory_()
        self._text = torch.zeros(REGIONS, ENTRIES, TEXT, dtype=torch.uint8).share_memory_()

    # ----------------------------------------------------------------- writing (one region each)
    def begin(self, writer: int, tag: int) -> "Region":
        """The region of ``writer`` (a DataLoader worker id; 0 in the main process), emptied for
        the iteration ``tag``."""
        r = writer % REGIONS
        ints = self._ints[r].numpy()
        ints[1:] = 0
        ints[0] = tag
        return Region(r, ints, self._text[r].numpy(), self, tag)

    # ----------------------------------------------------------------- reading (any process)
    def latest(self, tag: int) -> int:
        """The latest iteration of ``tag``'s generation that a region holds (a plain
        DataLoader's workers advance epochs by themselves), or ``tag``."""
        tags = self._ints[:, 0].numpy()
        same = tags[(tags >> 32) == (tag >> 32)]
        return int(max(same.max(), tag)) if same.size else tag

    def _current(self, tag: int) -> list[int]:
        return [r for r in range(REGIONS) if int(self._ints[r, 0]) == tag]

    def skipped(self, tag: int) -> int:
        """Samples of the iteration ``tag`` replaced or dropped because they could not be read."""
        return int(sum(int(self._ints[r, 1]) for r in self._current(tag)))

    def bad_shards(self, tag: int) -> list[dict]:
        """One entry per bad shard of the iteration ``tag``: ``shard`` (its number in the
        manifest), ``reason``, ``first_lost`` (the first sample that could not be read) and
        ``samples_lost`` (how many of its samples this rank lost), by shard number."""
        merged: dict[int, dict] = {}
        for r in self._current(tag):
            ints = self._ints[r].numpy()
            for e in range(min(int(ints[2]), ENTRIES)):
                shard, first, lost, n = (int(v) for v in ints[_HEAD + e * _ENTRY:_HEAD + (e + 1) * _ENTRY])
                reason = bytes(self._text[r, e, :n].numpy()).decode("utf-8", "replace")
                entry = merged.setdefault(shard, {"shard": shard, "reason": reason,
                                                  "first_lost": first, "samples_lost": 0})
                entry["first_lost"] = min(entry["first_lost"], first)
                entry["samples_lost"] += lost
        return [merged[k] for k in sorted(merged)]

    def unlisted(self, tag: int) -> int:
        """Bad shards found beyond what the table lists."""
        return int(sum(int(self._ints[r, 3]) for r in self._current(tag)))

    def listed(self, tag: int, shard: int, exclude: int = -1) -> bool:
        """Whether a region other than ``exclude`` already lists ``shard`` in iteration ``tag``."""
        for r in self._current(tag):
            if r == exclude:
                continue
            ints = self._ints[r].numpy()
            n = min(int(ints[2]), ENTRIES)
            if shard in ints[_HEAD:_HEAD + n * _ENTRY:_ENTRY]:
                return True
        return False


class Region:
    """One writer's region of a :class:`SkipLog` for one iteration."""

    __slots__ = ("region", "ints", "text", "log", "tag", "_index")

    def __init__(self, region: int, ints: np.ndarray, text: np.ndarray, log: SkipLog, tag: int):
        self.region, self.ints, self.text, self.log, self.tag = region, ints, text, log, tag
        self._index: dict[int, int] = {}  # shard number -> entry

    @property
    def samples(self) -> int:
        return int(self.ints[1])

    def sample(self, shard: int | None = None) -> None:
        """One sample replaced or dropped (of ``shard`` when it is listed as bad)."""
        self.ints[1] += 1
        e = -1 if shard is None else self._index.get(shard, -1)
        if e >= 0:
            self.ints[_HEAD + e * _ENTRY + 2] += 1

    def shard(self, shard: int, first_lost: int, reason: str) -> int:
        """List ``shard`` as bad. Returns ``NEW`` when no process of this rank listed it before
        in this iteration (the caller logs it then), ``UNLISTED`` when it is new but the table is
        full (only counted: the caller must log it itself), else ``KNOWN``."""
        if shard in self._index:
            return KNOWN
        new = NEW if not self.log.listed(self.tag, shard, exclude=self.region) else KNOWN
        e = int(self.ints[2])
        if e >= ENTRIES:
            self.ints[3] += 1
            self._index[shard] = -1
            return UNLISTED
        raw = reason.encode("utf-8", "replace")[:TEXT]
        base = _HEAD + e * _ENTRY
        self.ints[base:base + _ENTRY] = (shard, first_lost, 0, len(raw))
        self.text[e, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.ints[2] = e + 1
        self._index[shard] = e
        return new
