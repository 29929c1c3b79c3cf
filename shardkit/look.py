"""Looking at a dataset: ``shardkit show`` (a summary), ``--grid`` (a contact sheet of a few samples
per class), ``--stats`` (one picture of its numbers) and ``--html`` (a report in a folder).

Samples are read through :class:`~shardkit.MapDataset`. The contact sheet draws a seeded choice:
sample indices in a seeded random order, read one by one until every class shown has
``per_class`` of them (so the first ``per_class`` of each class in a uniform random order, a
uniform choice), or, for shards without labels, the first ``samples`` of that order. The
statistics read every sample once, shard after shard (one sequential read per shard), or a
seeded subset (``max_samples``): labels as the manifest says, image sizes from the ``.json`` the
packer keeps (the original size), else from the image's header (JPEG frame header, Pillow's
header read, the ``.npy`` header); nothing is decoded. Everything is drawn with Pillow.

Text from the data (keys, class names) is data from strangers: the HTML report escapes it, and
files are named by number, never by a member's name.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Sequence, Union, cast

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .common import format_bytes
from .jpegheader import jpeg_size
from .shardformat import IMAGE_FIELDS, MAX_PIXELS
from .storage import redact

if TYPE_CHECKING:
    from .access import MapDataset
    from .manifest import Location, Manifest

    Source = Union[Location, MapDataset]

# The contact sheet's layout: ``sheet_size`` is the promise, ``contact_sheet`` keeps it.
THUMB = 128  # default thumbnail box (pixels, square; images keep their aspect inside it)
PAD = 8  # between cells and around the sheet
LINE = 14  # one caption line (11-px font)
CAPTION = 2 * LINE + 2  # two lines under each thumbnail: class name, key
HEADER = 44  # the title and a line of what was chosen
COLUMNS = 8  # cells per row of a sheet without classes
MAX_CLASSES = 32  # rows of a sheet; more classes: a seeded choice of them (or classes=[...])

BACKGROUND, TEXT, MUTED = (255, 255, 255), (30, 30, 30), (110, 110, 110)
CELL, FRAME, GRID = (238, 238, 238), (200, 200, 200), (232, 232, 232)
BAR, BAR2, DOT = (70, 110, 170), (214, 120, 60), (40, 70, 140)


def sheet_size(rows: int, columns: int, thumb: int = THUMB) -> tuple[int, int]:
    """``(width, height)`` in pixels of a contact sheet of ``rows`` × ``columns`` cells (one row
    per class, ``per_class`` columns; without classes, rows of :data:`COLUMNS`)."""
    return PAD + columns * (thumb + PAD), HEADER + rows * (thumb + CAPTION + PAD)


# --------------------------------------------------------------------------- the summary


def summary(manifest: Manifest, source: str, keys: int = 5) -> str:
    """What ``shardkit show SOURCE`` prints: counts, classes, shards, options, skipped files and
    the first ``keys`` sample keys (read from the first shard)."""
    m = manifest
    sizes = [s.num_bytes for s in m.shards]
    lines = [f"dataset   {source}  ({m.created_by}, format v{m.format_version})",
             f"samples   {m.num_samples}"]
    flat = "none (flat folder)" if (m.options or {}).get("mode") else "none"
    classes = flat if m.classes is None else (
        f"{len(m.classes)}: " + ", ".join(m.classes[:10]) + (" ..." if len(m.classes) > 10 else ""))
    lines.append(f"classes   {classes}")
    if sizes:
        lines.append(f"shards    {len(m.shards)}, {format_bytes(sum(sizes))} in all, "
                     f"{format_bytes(min(sizes))} to {format_bytes(max(sizes))} each")
    else:
        lines.append("shards    0")
    opts = {k: v for k, v in m.options.items() if k != "fingerprint" and v is not None}
    lines.append("options   " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    if m.tensor:
        lines.append(f"tensors   dtype {m.tensor['dtype']}, layout {m.tensor['layout']}")
    lines.append(f"skipped   {len(m.skipped)}"
                 + "".join(f"\n  {s['path']}: {s['reason']}" for s in m.skipped[:10]))
    lines.append(f"ignored   {m.ignored} non-image files")
    for s in m.shards[:10]:
        assert s.sha256 is not None  # a loaded manifest's sha256 values are checked strings
        lines.append(f"  {redact(s.url)}  {s.num_samples} samples  {format_bytes(s.num_bytes)}  "
                     f"sha256 {s.sha256[:16]}…")
    if len(m.shards) > 10:
        lines.append(f"  ... {len(m.shards) - 10} more shards")
    if keys and m.shards:
        lines.append("keys      " + ", ".join(first_keys(m, keys)))
    return "\n".join(lines)


def first_keys(manifest: Manifest, n: int) -> list[str]:
    """The first ``n`` sample keys of the first shard, read through the manifest's store."""
    from .shardformat import iter_keys

    shard = manifest.shards[0]
    store = manifest.shard_store()
    keys: list[str] = []
    stream = store.open_range(shard.url, 0, shard.num_bytes)
    try:
        for key, _ in iter_keys(cast(BinaryIO, stream), store.url(shard.url)):
            if key not in keys:
                keys.append(key)
                if len(keys) >= n:
                    break
    finally:
        stream.close()
    return keys


# --------------------------------------------------------------------------- choosing samples


@dataclass
class Pick:
    """One chosen sample: its global index, key, label (-1: none), the label's name ("" without
    labels) and its raw sample dict."""

    index: int
    key: str
    label: int
    name: str
    sample: dict


def _open(source: Source, storage_options: dict | None, cache_dir: str | os.PathLike | None,
          ) -> MapDataset:
    from .access import MapDataset

    if isinstance(source, MapDataset):
        return source
    return MapDataset(source, decode="raw", storage_options=storage_options, cache_dir=cache_dir)


def _labeled(m: Manifest) -> bool:
    """Whether the samples carry labels: class names, or a label source the index found."""
    if m.classes:
        return True
    labels = m.labels
    return isinstance(labels, dict) and ("json" in labels or labels.get("field") is not None)


def _labeler(m: Manifest) -> Callable[[dict], int]:
    """A sample's label as the manifest says; -1 for none, or one that cannot be read."""
    from .assembly import Labeler
    from .decode import ImageDecodeError

    if not _labeled(m):
        return lambda sample: -1
    labeler = Labeler(m.labels, m.classes)

    def label(sample: dict) -> int:
        try:
            return labeler(sample)
        except ImageDecodeError:
            return -1

    return label


def _location(m: Manifest) -> str:
    return redact(m.base_url) if m.base_url else f"{len(m.shards)} listed shards"


def _mode(m: Manifest) -> str:
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
        _check_count(name, value)
    if max_samples is not None:
        _check_count("max_samples", max_samples)
    m = _open(source, storage_options, cache_dir)
    man, n = m.manifest, len(m)
    label = _labeler(man)
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
    if not _labeled(man) or n == 0:
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
        for i in islice(seeded_order(n, seed), budget):
            looked += 1
            bar.update(1)
            sample = m.sample(i)
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
    return [(_label_name(c, names), got[c]) for c in order], looked


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _label_name(label: int, names: list[str] | None) -> str:
    if label < 0:
        return ""
    return names[label] if names and label < len(names) else str(label)


def _pick(m: MapDataset, index: int, label: Callable[[dict], int], names: list[str] | None) -> Pick:
    sample = m.sample(index)
    return _pick_of(sample, index, label(sample), names)


def _pick_of(sample: dict, index: int, label: int, names: list[str] | None) -> Pick:
    return Pick(index, str(sample["__key__"]), label, _label_name(label, names), sample)


# --------------------------------------------------------------------------- images


def picture(sample: dict, box: int = THUMB, layout: str | None = None) -> Image.Image:
    """The sample's image as an RGB picture at least ``box`` pixels on its shorter side where the
    image has them (JPEGs are decoded at a reduced scale); ``.npy`` arrays (H×W×C or C×H×W, any
    numeric type, stretched to 0..255 when not uint8) too. ``ValueError`` when it has none or it
    cannot be read; images over the pixel limit are refused from the header."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is not None:
        try:
            im = Image.open(io.BytesIO(bytes(sample[field])))
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels, over the limit of {MAX_PIXELS}")
            im.draft("RGB", (box, box))  # JPEG: decode at 1/2, 1/4 or 1/8 scale where that suffices
            return im.convert("RGB")
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot decode its .{field}: {exc}") from None
    if "npy" in sample:
        return _array_picture(_npy(bytes(sample["npy"])), layout)
    raise ValueError("no image member (jpg, png, webp, npy, ...)")


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran order, dtype, payload offset)`` of ``.npy`` bytes; nothing unpickled."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read(fp)
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise ValueError(f"not a valid .npy array: {exc}") from None
    if dtype.hasobject:
        raise ValueError("the array holds Python objects (pickle); refused")
    return tuple(shape), bool(fortran), dtype, fp.tell()


def _npy(data: bytes) -> np.ndarray:
    shape, fortran, dtype, offset = _npy_header(data)
    count = math.prod(shape)
    if dtype.kind not in "biuf" or len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"not a plain numeric array of shape {shape} ({dtype})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _hw_axes(shape: tuple[int, ...], layout: str | None) -> tuple[int, int, int | None] | None:
    """``(height axis, width axis, channel axis or None)`` of an array that is an image."""
    if len(shape) == 2:
        return 0, 1, None
    if len(shape) != 3:
        return None
    last, first = shape[2] in (1, 3, 4), shape[0] in (1, 3, 4)
    if last and (layout != "CHW" or not first):
        return 0, 1, 2
    if first:
        return 1, 2, 0
    return None


def _array_picture(arr: np.ndarray, layout: str | None) -> Image.Image:
    axes = _hw_axes(arr.shape, layout)
    if axes is None or 0 in arr.shape:
        raise ValueError(f"an array of shape {arr.shape} is not an image")
    h, w, c = axes
    if arr.shape[h] * arr.shape[w] > MAX_PIXELS:
        raise ValueError(f"{arr.shape[w]}x{arr.shape[h]} pixels, over the limit of {MAX_PIXELS}")
    arr = arr if c is None else np.moveaxis(arr, (h, w, c), (0, 1, 2))
    if arr.dtype != np.uint8:
        a = np.nan_to_num(arr.astype(np.float64))
        lo, hi = float(a.min()), float(a.max())
        arr = ((a - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def thumbnail(im: Image.Image, box: int = THUMB) -> Image.Image:
    """``im`` scaled (up or down) to fit a ``box`` × ``box`` square, keeping its aspect."""
    scale = min(box / im.width, box / im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if size == im.size:
        return im
    return im.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def image_size(sample: dict, metadata: bool = True, layout: str | None = None,
               ) -> tuple[tuple[int, int] | None, bool]:
    """``((width, height) or None, from metadata)``: the original size the packer kept in the
    sample's ``.json`` (``metadata``), else the stored image's, read from its header only."""
    if metadata and "json" in sample:
        try:
            meta = json.loads(bytes(sample["json"]))
        except (ValueError, UnicodeDecodeError):
            meta = None
        size = meta.get("size") if isinstance(meta, dict) else None
        if isinstance(size, list) and len(size) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            return (size[0], size[1]), True
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is not None:
        data = sample[field]
        size = jpeg_size(data) if field in ("jpg", "jpeg") else None
        if size is None:
            try:
                with Image.open(io.BytesIO(bytes(data))) as im:  # reads the header only
                    size = im.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                return None, False
        return (int(size[0]), int(size[1])), False
    if "npy" in sample:
        try:
            shape = _npy_header(bytes(sample["npy"]))[0]
        except ValueError:
            return None, False
        axes = _hw_axes(shape, layout)
        return (None if axes is None else (shape[axes[1]], shape[axes[0]])), False
    return None, False


# --------------------------------------------------------------------------- drawing helpers


@lru_cache(maxsize=None)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _clean(text: str) -> str:
    """One line of printable text (data may hold newlines, controls, lone surrogates)."""
    text = text[:400].encode("utf-8", "replace").decode("utf-8")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _fit(text: str, font: Any, width: float, middle: bool = False) -> str:
    """``text`` on one line, cut with an ellipsis to ``width`` pixels: its end, or with
    ``middle`` its middle (keys differ at both ends)."""
    text = _clean(text)
    if font.getlength(text) <= width:
        return text

    def cut(k: int) -> str:
        if not middle:
            return text[:k] + "…"
        return text[:(k + 1) // 2] + "…" + text[len(text) - k // 2:]

    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(cut(mid)) <= width:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)


def _placeholder(box: int, why: str) -> Image.Image:
    im = Image.new("RGB", (box, box), (250, 228, 228))
    d = ImageDraw.Draw(im)
    d.line((0, 0, box, box), fill=(200, 80, 80), width=2)
    d.line((0, box, box, 0), fill=(200, 80, 80), width=2)
    d.text((4, box // 2 - 7), _fit(why, _font(10), box - 8), font=_font(10), fill=(120, 0, 0))
    return im


def _thumbs(picks: list[Pick], box: int, layout: str | None,
            errors: list[dict]) -> list[Image.Image]:
    out = []
    for p in picks:
        try:
            out.append(thumbnail(picture(p.sample, box, layout), box))
        except ValueError as exc:
            errors.append({"index": p.index, "key": p.key, "error": str(exc)})
            out.append(_placeholder(box, "cannot decode"))
    return out


# --------------------------------------------------------------------------- the contact sheet


def contact_sheet(source: Source, path: str | os.PathLike | None = None, *, per_class: int = 4,
                  samples: int = 32, seed: int = 0, max_samples: int | None = None,
                  max_classes: int = MAX_CLASSES, classes: Sequence[str] | None = None,
                  thumb: int = THUMB, storage_options: dict | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  ) -> dict[str, Any]:
    """Draw a contact sheet: one row per class of ``per_class`` thumbnails (class name and key
    under each), or without labels rows of :data:`COLUMNS` of ``samples`` thumbnails; write it
    to ``path`` (PNG) when given.

    ``source``: a dataset location (anything :class:`~shardkit.MapDataset` takes) or a
    ``MapDataset``. The choice is :func:`choose`'s (``seed``, ``max_samples``, ``max_classes``,
    ``classes``). ``thumb``: the square each image is fitted into, keeping its aspect. The size
    is :func:`sheet_size`. Returns ``{"image", "path", "size", "rows", "columns", "groups"
    ([(class name or None, [(index, key), ...]), ...]), "looked_at", "errors"}``; a sample that
    cannot be decoded is drawn crossed out and listed in ``errors``."""
    _check_count("thumb", thumb)
    m = _open(source, storage_options, cache_dir)
    groups, looked = choose(m, per_class=per_class, samples=samples, seed=seed,
                            max_samples=max_samples, max_classes=max_classes, classes=classes,
                            progress=progress)
    layout = (m.manifest.tensor or {}).get("layout")
    labeled = bool(groups) and groups[0][0] is not None
    columns = per_class if labeled else COLUMNS
    rows: list[tuple[str | None, list[Pick]]] = []
    for name, picks in groups:
        if name is None:
            rows += [(None, picks[k:k + columns]) for k in range(0, len(picks), columns)] or [(None, [])]
        else:
            rows.append((name, picks))
    width, height = sheet_size(len(rows), columns, thumb)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    man = m.manifest
    what = (f"{len(groups)} of {len(man.classes)} classes" if man.classes
            else f"{len(groups)} labels" if labeled else "no labels")
    draw.text((PAD, 6), _fit(f"{_location(man)}", _font(14), width - 2 * PAD), font=_font(14),
              fill=TEXT)
    chosen = (f"{per_class} per class" if labeled else f"{sum(len(p) for _, p in rows)} samples")
    draw.text((PAD, 26), _fit(f"{man.num_samples} samples, {what}, {_mode(man)}; {chosen}, seed "
                              f"{seed}, {looked} read", _font(11), width - 2 * PAD),
              font=_font(11), fill=MUTED)
    errors: list[dict] = []
    small = _font(11)
    for r, (name, picks) in enumerate(rows):
        y = HEADER + r * (thumb + CAPTION + PAD)
        if not picks:
            draw.rectangle((PAD, y, width - PAD - 1, y + thumb - 1), fill=CELL)
            why = "no samples" if name is None else f"{name}: none among the {looked} samples read"
            draw.text((PAD + 4, y + 4), _fit(why, small, width - 2 * PAD - 8), font=small, fill=MUTED)
            draw.text((PAD, y + thumb + 1), _fit(name or "", small, width - 2 * PAD), font=small,
                      fill=TEXT)
            continue
        for c, (p, im) in enumerate(zip(picks, _thumbs(picks, thumb, layout, errors))):
            x = PAD + c * (thumb + PAD)
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=CELL)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
            first = p.name if name is not None else f"#{p.index}"
            draw.text((x, y + thumb + 1), _fit(first, small, thumb), font=small, fill=TEXT)
            draw.text((x, y + thumb + 1 + LINE), _fit(p.key, small, thumb, middle=True), font=small,
                      fill=MUTED)
    if path is not None:
        _save(sheet, path)
    return {"image": sheet, "path": None if path is None else str(path), "size": sheet.size,
            "rows": len(rows), "columns": columns,
            "groups": [(name, [(p.index, p.key) for p in picks]) for name, picks in groups],
            "looked_at": looked, "errors": errors}


def _save(im: Image.Image, path: str | os.PathLike) -> None:
    """Write a picture atomically: JPEG for a ``.jpg`` / ``.jpeg`` path, else PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            im.save(tmp, format="JPEG", quality=88)
        else:
            im.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- statistics


def _all_samples(m: MapDataset) -> Iterator[dict]:
    """Every raw sample, shard after shard: one sequential read of each shard."""
    reader = m.reader
    for shard in range(len(m.manifest.shards)):
        offsets = reader.offsets(shard)
        yield from reader._samples(shard, offsets, 0, len(offsets) - 1, tail=False)


def dataset_stats(source: Source, *, seed: int = 0, max_samples: int | None = None,
                  storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """The numbers :func:`stats_picture` draws, from one pass over the samples.

    Every sample is read, shard after shard (one sequential read each), or with
    ``max_samples`` a seeded subset of that many (``seed``). Nothing is decoded: labels as the
    manifest says, sizes from the packer's ``.json`` (original sizes) or image headers. A
    progress bar shows when this takes over a second (``progress``). Returns ``{"location",
    "mode", "num_samples", "num_shards", "num_bytes", "classes", "looked_at", "subset", "seed",
    "per_class" (name -> count, in class order; None without labels), "unlabeled",
    "shard_samples", "shard_bytes" (per shard, from the manifest), "widths", "heights" (per
    sample read, -1 where unknown), "sizes_from_metadata", "seconds"}``."""
    from tqdm import tqdm

    if max_samples is not None:
        _check_count("max_samples", max_samples)
    start = time.perf_counter()
    m = _open(source, storage_options, cache_dir)
    man, n = m.manifest, len(m)
    label = _labeler(man)
    packed = bool(man.options.get("mode")) if isinstance(man.options, dict) else False
    layout = (man.tensor or {}).get("layout")
    subset = max_samples is not None and max_samples < n
    if subset:
        assert max_samples is not None
        chosen = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        count = max_samples
        it: Iterator[dict] = (m.sample(int(i)) for i in chosen)
    else:
        count, it = n, _all_samples(m)
    labels = np.full(count, -1, dtype=np.int64)
    widths = np.full(count, -1, dtype=np.int64)
    heights = np.full(count, -1, dtype=np.int64)
    from_meta = 0
    seen = 0
    with tqdm(total=count, desc="reading samples", unit="sample", delay=1.0, leave=False,
              disable=not progress) as bar:
        for j, sample in enumerate(it):
            if j >= count:  # more than the manifest counts: the reader would have said so
                break
            labels[j] = label(sample)
            size, meta = image_size(sample, packed, layout)
            if size is not None:
                widths[j], heights[j] = size
                from_meta += meta
            seen = j + 1
            bar.update(1)
    labels, widths, heights = labels[:seen], widths[:seen], heights[:seen]
    names = man.classes
    per_class: dict[str, int] | None = None
    known = labels >= 0
    if names:
        inside = known & (labels < len(names))
        counts = np.bincount(labels[inside], minlength=len(names))
        per_class = {name: int(c) for name, c in zip(names, counts)}
        unlabeled = int(seen - inside.sum())
    elif known.any():
        values, counts = np.unique(labels[known], return_counts=True)
        per_class = {str(v): int(c) for v, c in zip(values.tolist(), counts.tolist())}
        unlabeled = int(seen - known.sum())
    else:
        unlabeled = seen
    return {"location": _location(man), "mode": _mode(man), "num_samples": n,
            "num_shards": len(man.shards), "num_bytes": man.num_bytes, "classes": names,
            "looked_at": seen, "subset": subset, "seed": seed, "per_class": per_class,
            "unlabeled": unlabeled, "shard_samples": np.asarray(man.shard_sizes(), dtype=np.int64),
            "shard_bytes": _shard_bytes(man), "widths": widths, "heights": heights,
            "sizes_from_metadata": int(from_meta), "seconds": time.perf_counter() - start}


def _shard_bytes(man: Manifest) -> np.ndarray:
    shards = man.shards
    table_bytes = getattr(shards, "num_bytes", None)
    if callable(table_bytes):  # a ShardTable (manifest.cols): one column
        return np.asarray(table_bytes(), dtype=np.int64)
    return np.fromiter((s.num_bytes for s in shards), dtype=np.int64, count=len(shards))


def stats_picture(source: Source, path: str | os.PathLike | None = None, *, seed: int = 0,
                  max_samples: int | None = None, top: int = 15,
                  storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Draw a dataset's numbers in one picture and write it to ``path`` (PNG) when given:
    samples per class (bars, most first; the ``top`` largest and smallest when there are more
    than ``2 * top`` classes), samples and bytes per shard (bars, or histograms beyond 100
    shards), and image sizes (width × height, each dot a sample, darker where many are).

    The numbers are :func:`dataset_stats`'s (``seed``, ``max_samples``, ``progress``); returns
    them with ``"image"``, ``"path"`` and ``"size"`` added."""
    _check_count("top", top)
    stats = dataset_stats(source, seed=seed, max_samples=max_samples,
                          storage_options=storage_options, cache_dir=cache_dir, progress=progress)
    im = draw_stats(stats, top=top)
    if path is not None:
        _save(im, path)
    stats.update(image=im, path=None if path is None else str(path), size=im.size)
    return stats


PANEL_W, PANEL_H, MARGIN, TITLE_H = 600, 400, 16, 64


def draw_stats(stats: dict[str, Any], top: int = 15) -> Image.Image:
    """The picture of :func:`dataset_stats`'s numbers (see :func:`stats_picture`)."""
    per_class = stats["per_class"]
    bars = 0 if not per_class else min(len(per_class), 2 * top + 1)
    class_h = max(PANEL_H, 64 + bars * 16)
    width = 2 * PANEL_W + 3 * MARGIN
    height = TITLE_H + class_h + PANEL_H + 2 * MARGIN
    im = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(im)
    d.text((MARGIN, 10), _fit(stats["location"], _font(18), width - 2 * MARGIN), font=_font(18),
           fill=TEXT)
    classes = stats["classes"]
    what = (f"{len(classes)} classes" if classes else
            f"{len(per_class)} labels" if per_class else "no labels")
    read = (f"a seeded subset of {stats['looked_at']} samples (seed {stats['seed']})"
            if stats["subset"] else f"all {stats['looked_at']:,} samples")
    line = (f"{stats['num_samples']:,} samples · {what} · {stats['num_shards']:,} shards · "
            f"{format_bytes(stats['num_bytes'])} · {stats['mode']} · read {read} in "
            f"{stats['seconds']:.1f} s")
    d.text((MARGIN, 38), _fit(line, _font(12), width - 2 * MARGIN), font=_font(12), fill=MUTED)
    x0, x1 = MARGIN, 2 * MARGIN + PANEL_W
    y0, y1 = TITLE_H, TITLE_H + class_h + MARGIN
    _class_panel(d, (x0, y0, x0 + PANEL_W, y0 + class_h), stats, top)
    _size_panel(d, im, (x1, y0, x1 + PANEL_W, y0 + class_h), stats)
    _shard_panel(d, (x0, y1, x0 + PANEL_W, y1 + PANEL_H), "Samples per shard",
                 stats["shard_samples"], lambda v: f"{v:,.0f}")
    _shard_panel(d, (x1, y1, x1 + PANEL_W, y1 + PANEL_H), "Shard sizes",
                 stats["shard_bytes"], format_bytes)
    return im


Box = tuple[int, int, int, int]


def _panel(d: ImageDraw.ImageDraw, box: Box, title: str, note: str = "") -> None:
    d.rectangle(box, outline=FRAME)
    d.text((box[0] + 10, box[1] + 8), title, font=_font(14), fill=TEXT)
    if note:
        left = box[0] + 20 + _font(14).getlength(title)
        d.text((left, box[1] + 10), _fit(note, _font(11), box[2] - left - 10), font=_font(11),
               fill=MUTED)


def nice_ticks(vmax: float, n: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``vmax`` (steps of 1, 2 or 5 × 10^k)."""
    if vmax <= 0:
        return [0.0, 1.0]
    mag = 10.0 ** math.floor(math.log10(vmax / n))
    steps = [s * mag for s in (1, 2, 5, 10, 20) if vmax < 1 or s * mag >= 1]  # whole counts
    step = min(steps, key=lambda st: (abs(math.ceil(vmax / st - 1e-9) - n), st))
    if step == int(step):
        step = int(step)
    count = math.ceil(vmax / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def _class_panel(d: ImageDraw.ImageDraw, box: Box, stats: dict, top: int) -> None:
    per_class = stats["per_class"]
    unlabeled = stats["unlabeled"]
    if not per_class:
        _panel(d, box, "Samples per class")
        d.text((box[0] + 10, box[1] + 40), f"no labels: {stats['looked_at']:,} samples read",
               font=_font(12), fill=MUTED)
        return
    items = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    counts = np.array([c for _, c in items])
    note = (f"{len(items)} classes; min {counts.min():,}, median {np.median(counts):,.0f}, "
            f"max {counts.max():,}" + (f"; {unlabeled:,} without a label" if unlabeled else ""))
    _panel(d, box, "Samples per class", note)
    rows: list[tuple[str, int] | None] = list(items)
    split = len(items) > 2 * top + 1
    if split:  # the largest and the smallest classes
        rows = [*items[:top], None, *items[-top:]]
    font = _font(11)
    rh = max(16, min(28, (box[3] - box[1] - 70) // len(rows)))  # a row per bar
    label_w = min(170, int(max(font.getlength(_clean(name)) for name, _ in items)) + 8)
    ticks = nice_ticks(float(counts.max()))
    left, right = box[0] + 10 + label_w, box[2] - 50
    y = box[1] + 36
    scale = (right - left) / ticks[-1]
    for t in ticks:
        x = left + t * scale
        d.line((x, y, x, y + len(rows) * rh), fill=GRID)
        d.text((x - font.getlength(f"{t:,.0f}") / 2, y + len(rows) * rh + 2), f"{t:,.0f}",
               font=font, fill=MUTED)
    for r, row in enumerate(rows):
        yy = y + r * rh
        if row is None:
            d.text((box[0] + 10, yy + rh // 2 - 7), f"… {len(items) - 2 * top:,} more classes …",
                   font=font, fill=MUTED)
            continue
        name, count = row
        d.text((box[0] + 10, yy + rh // 2 - 7), _fit(name, font, label_w - 8), font=font, fill=TEXT)
        d.rectangle((left, yy + 2, left + max(1, round(count * scale)), yy + rh - 3),
                    fill=BAR2 if split and r > top else BAR)
        d.text((left + count * scale + 4, yy + rh // 2 - 7), f"{count:,}", font=font, fill=TEXT)


def _shard_panel(d: ImageDraw.ImageDraw, box: Box, title: str, values: np.ndarray,
                 fmt: Callable[[float], str]) -> None:
    font = _font(11)
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        _panel(d, box, title, "no shards")
        return
    note = (f"{len(values):,} shards; min {fmt(values.min())}, median {fmt(np.median(values))}, "
            f"max {fmt(values.max())}")
    left, right, top_y, bottom = box[0] + 70, box[2] - 16, box[1] + 40, box[3] - 40
    if len(values) <= 100:  # a bar per shard
        _panel(d, box, title, note)
        heights, xs, centred = values, None, True
        xlabel = "shard"
    else:  # a histogram of the shards' values
        _panel(d, box, title + " (histogram)", note)
        lo, hi = float(values.min()), float(values.max())
        if np.all(values == np.round(values)) and hi - lo < 40:  # a bin per whole number
            edges = np.arange(lo - 0.5, hi + 1.0)
            heights = np.histogram(values, bins=edges)[0]
            xs, centred = edges + 0.5, True  # labelled at the bars' middles
        else:
            heights, xs = np.histogram(values, bins=30, range=(lo, hi if hi > lo else lo + 1))
            centred = False  # labelled at the bins' edges
        xlabel = "shards with this many" if "Samples" in title else "shards of this size"
    ticks = nice_ticks(float(np.max(heights)))
    yscale = (bottom - top_y) / ticks[-1]
    for t in ticks:
        y = bottom - t * yscale
        d.line((left, y, right, y), fill=GRID)
        text = f"{t:,.0f}" if xs is not None else fmt(t)
        d.text((left - 6 - font.getlength(text), y - 7), text, font=font, fill=MUTED)
    n = len(heights)
    step = (right - left) / n
    for i, h in enumerate(heights):
        xa = left + i * step
        d.rectangle((xa + (1 if step > 3 else 0), bottom - h * yscale, xa + step - 1, bottom),
                    fill=BAR)
    d.line((left, bottom, right, bottom), fill=TEXT)
    if xs is None:
        marks = sorted({0, n - 1, *range(0, n, max(1, math.ceil(n / 8)))})
        for i in marks:
            text = str(i)
            d.text((left + (i + 0.5) * step - font.getlength(text) / 2, bottom + 4), text,
                   font=font, fill=MUTED)
    else:
        every = max(1, math.ceil(n / 8)) if centred else 6
        for k in range(0, n if centred else n + 1, every):
            text = fmt(xs[k])
            x = left + (k + (0.5 if centred else 0)) * step
            d.text((x - font.getlength(text) / 2, bottom + 4), text, font=font, fill=MUTED)
    d.text((right - font.getlength(xlabel), bottom + 20), xlabel, font=font, fill=MUTED)


def _size_panel(d: ImageDraw.ImageDraw, im: Image.Image, box: Box, stats: dict) -> None:
    font = _font(11)
    w, h = stats["widths"], stats["heights"]
    ok = (w > 0) & (h > 0)
    w, h = w[ok], h[ok]
    source = ("original sizes (packer's metadata)" if stats["sizes_from_metadata"] == len(w)
              else "stored sizes (image headers)" if stats["sizes_from_metadata"] == 0
              else "original sizes (metadata), else headers")
    if len(w) == 0:
        _panel(d, box, "Image sizes", "no sizes known")
        return
    pairs, counts = np.unique(np.stack([w, h], axis=1), axis=0, return_counts=True)
    common = ", ".join(f"{a}x{b} ({c:,})" for (a, b), c in
                       sorted(zip(pairs.tolist(), counts.tolist()), key=lambda t: -t[1])[:3] if c > 1)
    _panel(d, box, "Image sizes", f"{source}; width x height")
    d.text((box[0] + 10, box[1] + 28),
           _fit(f"width {w.min()} to {w.max()} (median {np.median(w):.0f}), height {h.min()} to "
                f"{h.max()} (median {np.median(h):.0f}); {len(pairs):,} distinct sizes"
                + (f", most common: {common}" if common else ""), font,
                box[2] - box[0] - 20), font=font, fill=MUTED)
    left, right, top_y, bottom = box[0] + 56, box[2] - 20, box[1] + 52, box[3] - 40
    xt, yt = nice_ticks(1.05 * float(w.max())), nice_ticks(1.05 * float(h.max()))  # dots inside
    xs, ys = (right - left) / xt[-1], (bottom - top_y) / yt[-1]
    for t in xt:
        x = left + t * xs
        d.line((x, top_y, x, bottom), fill=GRID)
        d.text((x - font.getlength(f"{t:,.0f}") / 2, bottom + 4), f"{t:,.0f}", font=font, fill=MUTED)
    for t in yt:
        y = bottom - t * ys
        d.line((left, y, right, y), fill=GRID)
        d.text((left - 6 - font.getlength(f"{t:,.0f}"), y - 7), f"{t:,.0f}", font=font, fill=MUTED)
    d.line((left, bottom, right, bottom), fill=TEXT)
    d.line((left, top_y, left, bottom), fill=TEXT)
    d.text((right - font.getlength("width"), bottom + 20), "width", font=font, fill=MUTED)
    d.text((left + 4, top_y + 2), "height", font=font, fill=MUTED)
    # dots: a density raster (any number of samples costs the same), each dot 5x5 pixels
    pw, ph = right - left + 1, bottom - top_y + 1
    px = np.clip(np.round(w * xs).astype(np.int64), 0, pw - 1)
    py = np.clip(np.round(bottom - top_y - h * ys).astype(np.int64), 0, ph - 1)
    grid = np.pad(np.bincount(py * pw + px, minlength=pw * ph).reshape(ph, pw).astype(np.float64), 2)
    dense = np.zeros((ph, pw))
    for dy in range(5):
        for dx in range(5):
            dense = np.maximum(dense, grid[dy:dy + ph, dx:dx + pw])
    alpha = np.where(dense > 0, 0.35 + 0.65 * np.log1p(dense) / np.log1p(dense.max()), 0.0)
    layer = np.zeros((ph, pw, 4), dtype=np.uint8)
    layer[..., :3] = DOT
    layer[..., 3] = (alpha * 255).astype(np.uint8)
    rgba = Image.fromarray(layer)
    im.paste(rgba, (left, top_y), rgba)


# --------------------------------------------------------------------------- the HTML report

_THUMB_NAME = re.compile(r"\d{6}\.jpg")

_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#1e1e1e}
pre{background:#f4f4f4;padding:12px;overflow-x:auto}
.row{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:%(w)dpx}
figure img{display:block;margin:auto;background:#eee}
figcaption{font-size:12px;overflow-wrap:anywhere;color:#555}
.none{color:#888}"""


def html_report(source: Source, folder: str | os.PathLike, *, per_class: int = 4,
                samples: int = 32, seed: int = 0, max_samples: int | None = None,
                max_classes: int = MAX_CLASSES, classes: Sequence[str] | None = None,
                thumb: int = THUMB, keys: int = 5, storage_options: dict | None = None,
                cache_dir: str | os.PathLike | None = None, progress: bool = True,
                ) -> dict[str, Any]:
    """Write a self-contained report into ``folder``: ``index.html`` (no script, paths
    relative), ``stats.png`` (:func:`stats_picture`) and ``thumbs/000000.jpg``, … (the
    :func:`choose` samples, named by number). The page holds :func:`summary`'s text, the
    statistics picture and the thumbnails per class with their keys and labels; every text
    from the data is escaped. Returns ``{"index", "stats", "groups", "thumbs", "errors"}``."""
    _check_count("thumb", thumb)
    m = _open(source, storage_options, cache_dir)
    man = m.manifest
    out = Path(folder)
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    for old in thumbs.iterdir():  # an earlier report's thumbnails (only the names written here)
        if _THUMB_NAME.fullmatch(old.name) and old.is_file():
            old.unlink()
    stats = stats_picture(m, out / "stats.png", seed=seed, max_samples=max_samples,
                          progress=progress)
    groups, looked = choose(m, per_class=per_class, samples=samples, seed=seed,
                            max_samples=max_samples, max_classes=max_classes, classes=classes,
                            progress=progress)
    layout = (man.tensor or {}).get("layout")
    esc = html.escape
    where = _location(man)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta http-equiv="Content-Security-Policy" content="script-src \'none\'; '
             'object-src \'none\'">',
             f"<title>shardkit show: {esc(where)}</title>",
             f"<style>{_STYLE % {'w': thumb}}</style></head><body>",
             f"<h1>{esc(where)}</h1>", "<h2>Summary</h2>",
             f"<pre>{esc(summary(man, where, keys))}</pre>", "<h2>Statistics</h2>",
             f'<img src="stats.png" width="{stats["size"][0]}" height="{stats["size"][1]}" '
             f'alt="samples per class, per shard, shard sizes, image sizes">',
             "<h2>Samples</h2>",
             f"<p>Seed {seed}; {looked:,} samples read to choose "
             + (f"{per_class} per class.</p>" if groups and groups[0][0] is not None
                else f"{sum(len(p) for _, p in groups)} samples.</p>")]
    errors: list[dict] = []
    count = 0
    for name, picks in groups:
        if name is not None:
            parts.append(f"<h3>{esc(name)}</h3>")
        if not picks:
            parts.append(f'<p class="none">none among the {looked:,} samples read</p>')
            continue
        parts.append('<div class="row">')
        for p, im in zip(picks, _thumbs(picks, thumb, layout, errors)):
            file = f"{count:06d}.jpg"
            im.save(thumbs / file, format="JPEG", quality=85)
            count += 1
            label = "no label" if p.label < 0 else (
                f"label {p.label}" + (f" ({p.name})" if p.name != str(p.label) else ""))
            parts.append(f'<figure><img src="thumbs/{file}" width="{im.width}" '
                         f'height="{im.height}" alt="{esc(p.key)}"><figcaption>'
                         f"{esc(p.key)}<br>{esc(label)} · #{p.index}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    index = out / "index.html"
    tmp = out / f".index.html.tmp-{os.getpid()}"
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, index)
    return {"index": str(index), "stats": stats, "thumbs": count, "errors": errors,
            "groups": [(name, [(p.index, p.key) for p in picks]) for name, picks in groups]}


__all__ = ["Pick", "choose", "contact_sheet", "dataset_stats", "draw_stats", "first_keys",
           "html_report", "image_size", "nice_ticks", "picture", "seeded_order", "sheet_size",
           "stats_picture", "summary", "thumbnail"]
