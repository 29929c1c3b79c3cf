"""Sample assembly: raw samples in read order -> decoded items in the plan's order.

:class:`SampleDecoder` turns a raw sample dict into ``(image, label[, key])``: the label from
``cls``, the image decoded (with the decode-fused crop, seeded per sample from ``seed/epoch/key``)
and transformed. :func:`emit` holds read samples until the plan emits them (the worker's shuffle
buffer) and replaces a bad one by the last good one, so that every rank still yields the same
number of samples and batches; while reads wait, held crops are decoded before their turn
(:class:`_Reading`). Batches are made in :mod:`shardkit.batching`; what ``decode=``
does with an image is its mode's (:mod:`shardkit.modes`).
"""

from __future__ import annotations

import heapq
import json
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .background import Background
from .batching import Sink
from .decode import ImageDecodeError, crop_rng
from .errors import DecodeError, OnError, ShardError
from .modes import DecodeConfig
from .plan import WorkerPlan, resume_position
from .reader import BadSample
from .shardformat import IMAGE_FIELDS
from .skiplog import Region


class Labeler:
    """A sample's label, as one manifest says (``labels``, ``classes``): ``.cls`` as a number
    unless it says otherwise; ``remap`` maps it into a shared label space."""

    def __init__(self, labels: dict | None = None, classes: list[str] | None = None):
        labels = labels or {"field": "cls"}
        self.label_field: str | None  # the member labels come from; None: no labels
        self.label_key: str | None  # a key of that (JSON) member
        if "json" in labels:
            self.label_field, self.label_key = "json", labels["json"]
        else:
            self.label_field, self.label_key = labels.get("field"), None
        # labels that are class names -> index
        self.label_names = ({name: i for i, name in enumerate(classes or [])}
                            if labels.get("names") else None)
        self.remap: np.ndarray | None = None

    def __call__(self, sample: dict) -> int:
        label = self._label(sample)
        if self.remap is None or label < 0:
            return label
        if label >= len(self.remap):
            raise ImageDecodeError(f"label {label} is not one of its source's "
                                   f"{len(self.remap)} classes")
        return int(self.remap[label])

    def _label(self, sample: dict) -> int:
        raw = None if self.label_field is None else sample.get(self.label_field)
        if raw is None:
            return -1
        if self.label_key is not None:
            try:
                value = json.loads(bytes(raw))[self.label_key]
            except (ValueError, KeyError, TypeError, IndexError):
                raise ImageDecodeError(f"its .json has no {self.label_key!r} label") from None
            if isinstance(value, int) and not isinstance(value, bool) and self.label_names is None:
                return value
            text = str(value)
        else:
            raw = bytes(raw).strip()
            if self.label_names is None:
                return _number(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ImageDecodeError(f"its .{self.label_field} is not text") from None
        if self.label_names is None:
            return _number(text)
        index = self.label_names.get(text)
        if index is None:
            raise ImageDecodeError(f"label {text[:40]!r} is not one of the manifest's classes")
        return index


class SampleDecoder:
    """A raw sample dict -> ``(image, label, *fields)`` (and the key last, ``with_keys``), or
    for a mode of sample dicts the sample dict itself (webdataset's form: ``__key__``,
    ``__url__`` and one bytes value per member).

    ``config`` (:class:`~shardkit.modes.DecodeConfig`) says what becomes of the image (its
    mode's strategy), the crop, transform, fields and keys. Where labels come from is the
    manifest's say (:meth:`configure`): ``.cls`` as a number unless it says otherwise; each
    source of a mixture has its own (samples say their source under ``"__source__"``)."""

    def __init__(self, config: DecodeConfig):
        self.config = config
        self.fields = tuple(config.fields.items())
        self.crop_seed = ""  # "seed/epoch/" of the running iteration: crops follow the plan's epoch
        self.labelers: list[Labeler] = [Labeler()]  # per source

    def configure(self, labels: dict | None, classes: list[str] | None) -> None:
        """Where labels come from (a manifest's ``labels`` and ``classes``)."""
        self.labelers = [Labeler(labels, classes)]

    def configure_sources(self, manifests: list, by_name: bool = False) -> list[str] | None:
        """Labels of several sources (their manifests' ``labels`` and ``classes``): each keeps its
        own label space, or with ``by_name`` all share one, the sorted union of their class
        names (returned), each source's labels mapped into it."""
        self.labelers = [Labeler(m.labels, m.classes) for m in manifests]
        if not by_name:
            return None
        missing = [m.base_url or "listed shards" for m in manifests if not m.classes]
        if missing:
            raise ValueError(f"label_space='by_name' needs each source's class names; "
                             f"{', '.join(missing)} lists none")
        names = sorted({c for m in manifests for c in m.classes})
        index = {c: i for i, c in enumerate(names)}
        for labeler, m in zip(self.labelers, manifests):
            labeler.remap = np.array([index[c] for c in m.classes], dtype=np.int64)
        return names

    def label(self, sample: dict) -> int:
        """The sample's class index (in its source's label space, or the shared one); -1
        without labels. ImageDecodeError for one that is not usable."""
        return self.labelers[sample.get("__source__", 0)](sample)

    def extras(self, sample: dict) -> tuple:
        """The ``fields`` of a sample: text, bytes, or None where it has no such member."""
        out = []
        for name, kind in self.fields:
            value = sample.get(name)
            if value is not None:
                if kind == "text":
                    try:
                        value = bytes(value).decode("utf-8")
                    except UnicodeDecodeError:
                        raise ImageDecodeError(f"its .{name} is not UTF-8 text") from None
                else:
                    value = bytes(value)
            out.append(value)
        return tuple(out)

    def __call__(self, sample: dict, out: np.ndarray | None = None) -> Any:
        config = self.config
        mode = config.mode
        if mode.sample_dicts:  # webdataset's sample dict, for a webdataset pipeline
            return {k: (bytes(v) if isinstance(v, memoryview) else v) for k, v in sample.items()}
        source = (sample.get("__source__", 0),) if config.with_source else ()
        key, url = sample["__key__"], sample["__url__"]
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        try:
            label = self.label(sample)
            extras = self.extras(sample) if self.fields else ()
            rng = None if config.crop is None else crop_rng(self.crop_seed, key)
            if field is not None:
                image = mode.image(sample[field], config, rng, out, key, url)
            elif "npy" in sample:
                image = mode.array(sample["npy"], config, rng, out, key, url)
            else:
                raise ImageDecodeError("sample has no image (no jpg/png/webp/npy member)")
        except ImageDecodeError as exc:
            raise DecodeError(url, exc.reason, key=key) from None
        if config.transform is not None:
            image = config.transform(image)
        if config.with_keys:
            return (image, label, *source, *extras, key)
        return (image, label, *source, *extras)


def _number(text: str | bytes) -> int:
    """A class label written as a number: 1-10 ASCII digits (``str.isdigit`` alone would take
    other scripts' digits)."""
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        raise ImageDecodeError(f"class label {text[:20]!r} is not a number")
    return int(text)


def emit(plan: WorkerPlan, consumed: int, read: Callable[[Any, int], Iterator], process: Callable,
         on_error: OnError, skips: Region, sink: Optional[Sink] = None,
         nothing_readable: Optional[Callable[[], Exception]] = None, ahead: int = 0) -> Iterator:
    """Processed samples in the plan's order from its ``consumed``-th on; a bad one is replaced
    by the last good one (``on_error="skip"``) or raised.

    ``read(spans, start)`` yields ``(stream position, raw sample or BadSample)`` (``spans`` None:
    the whole dataset); ``process`` is a :class:`SampleDecoder`; ``nothing_readable()`` is the
    error when no sample of the dataset can be read.
    With a ``sink``, each image is decoded into the sink's next slot; the last good sample is then
    kept raw and decoded again into the slot of the bad one it replaces.
    ``ahead``: how many held samples may be processed before their turn while reads wait
    (:class:`_Reading`); 0: none."""
    order = plan.order
    start = resume_position(order, consumed)
    already = set(order[:consumed].tolist()) if consumed else set()
    held: dict[int, Any] = {}
    reading = _Reading(read(plan.spans, start), held, already, order, ahead, process)
    last_good = None  # processed; raw with a sink
    try:
        for turn, idx in enumerate(order[consumed:].tolist(), consumed):
            if idx not in held:
                reading.until(idx, turn)
            raw = held.pop(idx)
            out = None if sink is None else sink.slot()
            sample = raw
            if idx in reading.early:
                sample = reading.early.pop(idx)
            elif not isinstance(sample, BadSample):
                try:
                    sample = process(sample, out)
                except DecodeError as exc:
                    sample = BadSample(exc)
            if isinstance(sample, BadSample):
                if on_error.raises:
                    raise sample.error
                skips.sample(raw.shard if isinstance(raw, BadSample) else None)
                if last_good is None:
                    last_good = _first_good(reading.items, held, process, read,
                                            nothing_readable, raw=sink is not None)
                if sink is None:
                    sample = last_good
                else:
                    sample, raw = process(last_good, out), last_good
            last_good = sample if sink is None else raw
            yield sample if sink is None else sink.settle(sample)
    finally:
        reading.close()


class _Reading:
    """A worker's read stream (``(position, raw sample)`` pairs) into its held samples.

    With ``ahead`` > 0, once a read has waited longer than ``WAITED`` seconds (a cold disk, a
    download still arriving; never on reads the page cache serves), the reads go on in a helper
    thread (:class:`~shardkit.background.Background`) for the rest of the iteration, and while
    the sample whose turn it is has not arrived, held samples are processed ahead of their turn,
    soonest turn first, at most ``ahead`` at a time. The decoder then works while the disk does
    instead of after it, and an epoch's end no longer decodes a whole buffer after the last read.
    What is emitted, and in which order, is unchanged: crops are seeded per sample, and a sample
    that fails is met at its turn as before. ``early`` holds the results."""

    WAITED = 0.01  # seconds one read may wait before the reads move to a helper thread

    def __init__(self, items: Iterator, held: dict, already: set, order: np.ndarray, ahead: int,
                 process: Callable):
        self.items: Any = items
        self._background: Optional[Background] = None  # the reads' thread, once they waited
        self.held, self.already, self.order = held, already, order
        self.ahead, self.process = ahead, process
        self.early: dict[int, Any] = {}
        self._soonest: list[tuple[int, int]] = []  # heap of (turn, position) not processed yet
        self._turn_of: Optional[np.ndarray] = None  # a position's turn, once in the background

    def until(self, idx: int, turn: int) -> None:
        """Read until sample ``idx`` (whose turn ``turn`` it is) is held."""
        held, items = self.held, self.items
        while idx not in held:
            if self._turn_of is None:
                began = time.perf_counter() if self.ahead else 0.0
                pos, sample = next(items)
                if pos not in self.already:
                    held[pos] = sample
                if self.ahead and time.perf_counter() - began > self.WAITED:
                    self._to_background()
                    items = self.items
                continue
            got = items.poll()
            if got is None:
                if len(self.early) < self.ahead and self._process_ahead(turn):
                    continue
                got = next(items)
            self._hold(*got)

    def _to_background(self) -> None:
        order = self.order  # (int32 turns where they fit: half the plan's order in memory)
        dtype = np.int32 if len(order) < 2**31 else np.int64
        turn_of = np.empty(len(order), dtype=dtype)
        turn_of[order] = np.arange(len(order), dtype=dtype)
        self._turn_of = turn_of
        self._soonest = [(int(turn_of[pos]), pos) for pos, sample in self.held.items()
                         if not isinstance(sample, BadSample)]
        heapq.heapify(self._soonest)
        self.items = self._background = Background(self.items)

    def _hold(self, pos: int, sample: Any) -> None:
        if pos in self.already:
            return
        self.held[pos] = sample
        if not isinstance(sample, BadSample):
            assert self._turn_of is not None
            heapq.heappush(self._soonest, (int(self._turn_of[pos]), pos))

    def _process_ahead(self, turn: int) -> bool:
        """Process the held sample whose turn comes soonest after ``turn`` (a DecodeError is kept
        for its turn); whether there was one."""
        soonest, held = self._soonest, self.held
        while soonest:
            t, pos = heapq.heappop(soonest)
            if t <= turn or pos not in held:
                continue
            try:
                self.early[pos] = self.process(held[pos])
            except DecodeError as exc:
                self.early[pos] = BadSample(exc)
            return True
        return False

    def close(self) -> None:
        """Stop the reads' thread, if they moved to one (also at interpreter exit, when module
        globals may be gone already: no global is named here)."""
        background = self._background
        if background is not None:
            background.close()


def _first_good(reader, held: dict, process, read, nothing_readable, raw: bool = False):
    """A replacement for a bad first sample: the next good one of this worker's stream
    (processed, or with ``raw`` as read, once it is known to process)."""
    def good(cand):
        if isinstance(cand, BadSample):
            return None
        try:
            processed = process(cand)
        except DecodeError:
            return None
        return cand if raw else processed

    for pos in sorted(held):
        found = good(held[pos])
        if found is not None:
            return found
    for pos, cand in reader:
        held[pos] = cand
        found = good(cand)
        if found is not None:
            return found
    # Every sample of this worker's share is bad: borrow the dataset's first good sample, so
    # that this rank still yields as many samples as the others.
    for _, cand in read(None, 0):
        found = good(cand)
        if found is not None:
            return found
    if nothing_readable is not None:
        raise nothing_readable()
    raise ShardError("the dataset", "no sample of the dataset can be read")
