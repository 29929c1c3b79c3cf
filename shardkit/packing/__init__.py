"""Packing: an image folder into reproducible tar shards, a manifest written last.

:func:`pack_folder` (:mod:`.pack`) wires the steps, one module each: :mod:`.options` (the
settings, checked once), :mod:`.folder` (scan: keys, labels), :mod:`.encode` (raw, resize or
tensor bytes of one sample), :mod:`.pool` (encoding ahead in workers, in order), :mod:`.shards`
(tar files within the size limits), :mod:`.journal` (the destination's state; resume) and
:mod:`.parts` (packing in parts; :func:`merge_parts`). The read path never imports from here.
"""

from .options import PackOptions
from .pack import pack_folder
from .parts import merge_parts

__all__ = ["PackOptions", "merge_parts", "pack_folder"]
