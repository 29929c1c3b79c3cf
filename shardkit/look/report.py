"""The HTML report (``shardkit show --html``): the summary, the stats picture and the chosen samples'
thumbnails in one folder, every text from the data escaped and every file named by number."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .choosing import MAX_CLASSES, check_count, choose, location_of, open_source
from .overview import summary
from .pictures import THUMB, pick_thumbnails
from .statspicture import stats_picture

if TYPE_CHECKING:
    from .choosing import Source


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
    check_count("thumb", thumb)
    m = open_source(source, storage_options, cache_dir)
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
    where = location_of(man)
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
        for p, im in zip(picks, pick_thumbnails(picks, thumb, layout, errors)):
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
    # keys that are not UTF-8 (surrogate escapes of their bytes) are written as \udcXX text
    tmp.write_text("\n".join(parts), encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, index)
    return {"index": str(index), "stats": stats, "thumbs": count, "errors": errors,
            "groups": [(name, [(p.index, p.key) for p in picks]) for name, picks in groups]}
