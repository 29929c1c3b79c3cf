"""Which samples to look at: a source opened as a raw :class:`~shardkit.MapDataset`, its labels as
the manifest says, and a seeded choice of samples (:func:`choose`).

The choice: sample indices in a seeded random order, read one by one until every class shown has
``per_class`` of them (so the first ``per_class`` of each class in a uniform random order, a
uniform choice), or, for shards without labels, the first ``samples`` of that order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, Union

import numpy as np

from ..storage import redact

if TYPE_CHECKING:
    from ..access import MapDataset
    from ..manifest import Location, Manifest

    Source = Union[Location, MapDataset]

MAX_CLASSES = 32  # rows of a sheet; more classes: a seeded choice of them (or classes=[...])


@dataclass
class Pick:
    """One chosen sample: its global index, key, label (-1: none), the label's name ("" without
    labels) and its raw sample dict."""

    index: int
    key: str
    label: int
    name: str
    sample: dict


def open_source(source: Source, storage_options: dict | None,
                cache_dir: str | os.PathLike | None) -> MapDataset:
    """``source`` as a raw :class:`~shardkit.MapDataset` (a ``MapDataset`` as it is)."""
    from ..access import MapDataset

    if isinstance(source, MapDataset):
        return source
    return MapDataset(source, decode="raw", storage_options=storage_options, cache_dir=cache_dir)


def labeled(m: Manifest) -> bool:
    """Whether the samples carry labels: class names, or a label source the index found."""
    if m.classes:
        return True
    labels = m.labels
    return isinstance(labels, dict) and ("json" in labels or labels.get("field") is not None)


def label_reader(m: Manifest) -> Callable[[dict], int]:
    """A sample's label as the manifest says; -1 for none, or one that cannot be read."""
    from ..assembly import Labeler
    from ..decode import ImageDecodeError

    if not labeled(m):
        return lambda sample: -1
    labeler = Labeler(m.labels, m.classes)

    def label(sample: dict) -> int:
        try:
            return labeler(sample)
        except ImageDecodeError:
            return -1

    return label


def location_of(m: Manifest) -> str:
    """Where the dataset is, for a title: its base URL (credentials redacted), or its shard count."""
    return redact(m.base_url) if m.base_url else f"{len(m.shards)} listed shards"


def mode_of(m: Manifest) -> str:
    """What the shards are: a pack's mode, indexed webdataset shards, or listed shards."""
    opts = m.options if isinstance(m.options, dict) else {}
    if opts.get("mode"):
        return f"{opts['mode']} pack"
    return "indexed webdataset shards" if opts.get("indexed_by") else "listed shards"


def seeded_order(n: int, seed: int) -> Iterator[int]:
    """The indices ``0 .. n-1`` in a seeded random order (lazily: a huge ``n`` costs only the
    indices taken)."""
    rng = np.random.default_rng(seed)
    if n <= 1 << 22:
        order = rng.permutation(n)
        for start in range(0, n, 4096):
            yield from order[start:start + 4096].tolist()
        return
    seen: set[int] = set()
    while len(seen) < n:
        for i in rng.integers(0, n, 4096).tolist():
            if i not in seen:
                seen.add(i)
                yield i


def choose(source: Source, *, per_class: int = 4, samples: int = 32, seed: int = 0,
           max_samples: int | None = None, max_classes: int = MAX_CLASSES,
           classes: Sequence[str] | None = None, storage_options: dict | None = None,
           cache_dir: str | os.PathLike | None = None, progress: bool = True,
           ) -> tuple[list[tuple[str | None, list[Pick]]], int]:
    """A seeded choice of samples to look at: ``(groups, looked_at)``.

    With labels, one group per class ``(class name, picks)``: ``per_class`` samples each, the
    first of that class in a seeded random order of all samples (read one by one until every
    class shown has its share, at most ``max_samples`` reads; default the larger of 10,000 and
    100 per wanted sample). At most ``max_classes`` classes (a seeded choice of them when there
    are more), or the ``classes`` named. Without labels, one group ``(None, picks)`` of the first
    ``samples`` samples of that order. ``looked_at``: how many samples were read."""
    for name, value in (("per_class", per_class), ("samples", samples),
                        ("max_classes", max_classes)):
        check_count(name, value)
    if max_samples is not None:
        check_count("max_samples", max_samples)
    m = open_source(source, storage_options, cache_dir)
    man, n = m.manifest, len(m)
    label = label_reader(man)
    names = man.classes
    if classes is not None:
        if not classes:
            raise ValueError("classes=: name at least one class (or None: all, up to max_classes)")
        if not names:
            raise ValueError("classes=: this dataset has no class names")
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise ValueError(f"classes=: not classes of this dataset: {unknown[:5]} (it has "
                             f"{len(names)}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
    if not labeled(man) or n == 0:
        picks = [_pick(m, i, label, names) for i in islice(seeded_order(n, seed), samples)]
        return [(None, picks)], len(picks)
    wanted: list[int] | None = None
    if names:
        if classes is not None:
            wanted = [names.index(c) for c in dict.fromkeys(classes)]
        elif len(names) > max_classes:
            rng = np.random.default_rng([seed, 1])
            wanted = sorted(rng.choice(len(names), max_classes, replace=False).tolist())
        else:
            wanted = list(range(len(names)))
    rows = len(wanted) if wanted is not None else max_classes
    budget = min(n, max_samples if max_samples is not None else max(10_000, 100 * per_class * rows))
    got: dict[int, list[Pick]] = {c: [] for c in wanted} if wanted is not None else {}
    missing = len(got) if wanted is not None else -1
    looked = 0
    from tqdm import tqdm

    with tqdm(total=budget, desc="choosing samples", unit="sample", delay=1.0, leave=False,
              disable=not progress) as bar:
        for i, sample in _read_in_order(m, islice(seeded_order(n, seed), budget)):
            looked += 1
            bar.update(1)
            lab = label(sample)
            if lab < 0 or (wanted is not None and lab not in got):
                continue
            if wanted is None and lab not in got:
                if len(got) >= max_classes:
                    continue
                got[lab] = []
            if len(got[lab]) < per_class:
                got[lab].append(_pick_of(sample, i, lab, names))
                if len(got[lab]) == per_class:
                    missing -= 1
                    if missing == 0:
                        break
    if wanted is None and not got:  # labelled by the manifest, but none found: show samples
        picks = [_pick(m, i, label, names) for i in islice(seeded_order(n, seed), samples)]
        return [(None, picks)], looked
    order = wanted if wanted is not None else sorted(got)
    return [(label_name(c, names), got[c]) for c in order], looked


def check_count(name: str, value: int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def label_name(label: int, names: list[str] | None) -> str:
    """A label's class name: "" for none, the number itself where no name is known."""
    if label < 0:
        return ""
    return names[label] if names and label < len(names) else str(label)


def _pick(m: MapDataset, index: int, label: Callable[[dict], int], names: list[str] | None) -> Pick:
    sample = m.sample(index)
    return _pick_of(sample, index, label(sample), names)


def _pick_of(sample: dict, index: int, label: int, names: list[str] | None) -> Pick:
    return Pick(index, str(sample["__key__"]), label, label_name(label, names), sample)


def _read_in_order(m: MapDataset, indices: Iterator[int], batch: int = 256
                   ) -> Iterator[tuple[int, dict]]:
    """``(i, m.sample(i))`` for each index, in the order given. A compressed dataset
    (``.tar.gz``: each read decompresses its shard from the start up to the sample) reads each
    ``batch`` of them sorted by index, so one shard's samples are taken in one forward pass."""
    if not m.manifest.compressed:
        for i in indices:
            yield i, m.sample(i)
        return
    while True:
        chunk = list(islice(indices, batch))
        if not chunk:
            return
        got = {i: m.sample(i) for i in sorted(chunk)}
        for i in chunk:
            yield i, got[i]
