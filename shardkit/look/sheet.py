"""The contact sheet (``shardkit show --grid``): one row of thumbnails per class, each captioned
with its class name and key, in a size :func:`sheet_size` promises."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image, ImageDraw

from .choosing import MAX_CLASSES, check_count, choose, location_of, mode_of, open_source
from .drawing import BACKGROUND, CELL, MUTED, TEXT, fit_text, font_at, save_picture
from .pictures import THUMB, pick_thumbnails

if TYPE_CHECKING:
    from .choosing import Pick, Source

# The contact sheet's layout: ``sheet_size`` is the promise, ``contact_sheet`` keeps it.
PAD = 8  # between cells and around the sheet
LINE = 14  # one caption line (11-px font)
CAPTION = 2 * LINE + 2  # two lines under each thumbnail: class name, key
HEADER = 44  # the title and a line of what was chosen
COLUMNS = 8  # cells per row of a sheet without classes


def sheet_size(rows: int, columns: int, thumb: int = THUMB) -> tuple[int, int]:
    """``(width, height)`` in pixels of a contact sheet of ``rows`` × ``columns`` cells (one row
    per class, ``per_class`` columns; without classes, rows of :data:`COLUMNS`)."""
    return PAD + columns * (thumb + PAD), HEADER + rows * (thumb + CAPTION + PAD)


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
    check_count("thumb", thumb)
    m = open_source(source, storage_options, cache_dir)
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
    draw.text((PAD, 6), fit_text(f"{location_of(man)}", font_at(14), width - 2 * PAD),
              font=font_at(14), fill=TEXT)
    chosen = (f"{per_class} per class" if labeled else f"{sum(len(p) for _, p in rows)} samples")
    draw.text((PAD, 26), fit_text(f"{man.num_samples} samples, {what}, {mode_of(man)}; {chosen}, "
                                  f"seed {seed}, {looked} read", font_at(11), width - 2 * PAD),
              font=font_at(11), fill=MUTED)
    errors: list[dict] = []
    small = font_at(11)
    for r, (name, picks) in enumerate(rows):
        y = HEADER + r * (thumb + CAPTION + PAD)
        if not picks:
            draw.rectangle((PAD, y, width - PAD - 1, y + thumb - 1), fill=CELL)
            why = "no samples" if name is None else f"{name}: none among the {looked} samples read"
            draw.text((PAD + 4, y + 4), fit_text(why, small, width - 2 * PAD - 8), font=small, fill=MUTED)
            draw.text((PAD, y + thumb + 1), fit_text(name or "", small, width - 2 * PAD), font=small,
                      fill=TEXT)
            continue
        for c, (p, im) in enumerate(zip(picks, pick_thumbnails(picks, thumb, layout, errors))):
            x = PAD + c * (thumb + PAD)
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=CELL)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
            first = p.name if name is not None else f"#{p.index}"
            draw.text((x, y + thumb + 1), fit_text(first, small, thumb), font=small, fill=TEXT)
            draw.text((x, y + thumb + 1 + LINE), fit_text(p.key, small, thumb, middle=True), font=small,
                      fill=MUTED)
    if path is not None:
        save_picture(sheet, path)
    return {"image": sheet, "path": None if path is None else str(path), "size": sheet.size,
            "rows": len(rows), "columns": columns,
            "groups": [(name, [(p.index, p.key) for p in picks]) for name, picks in groups],
            "looked_at": looked, "errors": errors}
