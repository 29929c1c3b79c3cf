"""Looking at a dataset: ``shardkit show`` (a summary), ``--grid`` (a contact sheet of a few samples
per class), ``--stats`` (one picture of its numbers) and ``--html`` (a report in a folder).

Samples are read through :class:`~shardkit.MapDataset`; nothing but the thumbnails is decoded, and
everything is drawn with Pillow. Text from the data (keys, class names) is data from strangers: the
HTML report escapes it, and files are named by number, never by a member's name.

One idea per module; each imports only those above it in this list:

    drawing (colours, fonts, text fitted to a width, panels, axis ticks, saving a picture) ·
    choosing (opening a source, labels, the seeded choice of samples) · pictures (a sample as an
    image, thumbnails, image sizes from metadata or headers, ``.npy`` headers) · overview (the
    text ``shardkit show`` prints) · sheet (the contact sheet) · stats (a dataset's numbers, one
    pass) · statspicture (those numbers drawn) · report (the HTML report).
"""

from __future__ import annotations

from .choosing import MAX_CLASSES as MAX_CLASSES
from .choosing import Pick, choose, seeded_order
from .drawing import nice_ticks
from .overview import first_keys, summary
from .pictures import THUMB as THUMB
from .pictures import image_size, picture, thumbnail
from .report import html_report
from .sheet import CAPTION as CAPTION
from .sheet import COLUMNS as COLUMNS
from .sheet import HEADER as HEADER
from .sheet import LINE as LINE
from .sheet import PAD as PAD
from .sheet import contact_sheet, sheet_size
from .stats import dataset_stats
from .statspicture import MARGIN as MARGIN
from .statspicture import PANEL_H as PANEL_H
from .statspicture import PANEL_W as PANEL_W
from .statspicture import TITLE_H as TITLE_H
from .statspicture import draw_stats, stats_picture

__all__ = ["Pick", "choose", "contact_sheet", "dataset_stats", "draw_stats", "first_keys",
           "html_report", "image_size", "nice_ticks", "picture", "seeded_order", "sheet_size",
           "stats_picture", "summary", "thumbnail"]
