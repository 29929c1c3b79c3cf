"""JPEG frame headers, read without decoding: what both packing (raw mode's cheap checks) and
reading (``decode="gpu"``: can nvJPEG take it?) need to know about a JPEG.

A few dozen bytes of work per file; anything unusual returns None, and the caller falls back to
Pillow and its messages.
"""

from __future__ import annotations

# Start-of-frame markers (SOF0..SOF15 without DHT, JPG and DAC, which share the range).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers RST0..RST7.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


def jpeg_frame(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int] | None:
    """``(marker, width, height, components)`` of a JPEG's frame header (SOF0..SOF15), or None
    when the marker walk fails. A few dozen bytes of work; anything unusual (no SOF, broken
    segment lengths) returns None and the caller falls back to Pillow and its messages."""
    n, i = len(data), 2
    if bytes(data[:3]) != b"\xff\xd8\xff":
        return None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            if i + 10 > n or length < 8:
                return None
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return (marker, width, height, data[i + 9]) if width and height else None
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / scan before any frame header
            return None
        i += 2 + length
    return None


def jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's frame header, or None (see :func:`jpeg_frame`)."""
    frame = jpeg_frame(data)
    return None if frame is None else (frame[1], frame[2])
