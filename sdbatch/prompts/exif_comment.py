"""The EXIF UserComment that carries A1111's infotext in JPEG and WebP files: written and read back.

A1111 stores the infotext as piexif writes it: the 8-byte character code `UNICODE\\0`, then UTF-16 big-endian,
in tag 0x9286 of the Exif IFD (0x8769), typed UNDEFINED as the EXIF standard says. We build those few bytes
ourselves rather than add piexif for one tag, and not with Pillow's `Image.Exif`: it types a sub-IFD's bytes as
BYTE, and readers built on piexif (sd-prompt-reader) then get a tuple of numbers instead of the comment.
"""

from __future__ import annotations

import struct

from PIL import Image

EXIF_IFD = 0x8769  # the pointer from IFD0 to the Exif IFD
USER_COMMENT = 0x9286
_UNICODE = b"UNICODE\x00"
_ASCII = b"ASCII\x00\x00\x00"
_UNDEFINED_TYPE, _LONG_TYPE = 7, 4
# JPEG keeps EXIF in one APP1 segment: 65535 bytes less its length field and the "Exif\0\0" header
MAX_EXIF_BYTES = 65533


def exif_with_comment(text: str) -> bytes:
    """`Exif\\0\\0` + a big-endian TIFF structure: IFD0 → Exif IFD → UserComment (UNICODE + UTF-16BE `text`)."""
    comment = _UNICODE + text.encode("utf-16-be")
    exif_ifd_at = 8 + 2 + 12 + 4  # header, IFD0: entry count, one entry, next-IFD offset
    data_at = exif_ifd_at + 2 + 12 + 4
    head = b"MM\x00\x2a" + struct.pack(">I", 8)
    ifd0 = struct.pack(">HHHII", 1, EXIF_IFD, _LONG_TYPE, 1, exif_ifd_at) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">HHHII", 1, USER_COMMENT, _UNDEFINED_TYPE, len(comment), data_at) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + head + ifd0 + exif_ifd + comment


def decode_comment(raw: bytes) -> str:
    """A UserComment's text: the UNICODE code as UTF-16 (big-endian as A1111 writes it, or with a byte-order mark,
    or little-endian as some tools write it), ASCII, or the undefined code read as UTF-8 (A1111's fallback)."""
    code, body = raw[:8], raw[8:]
    if code == _UNICODE:
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16", errors="replace")
        little = len(body) >= 2 and body[0] != 0 and body[1] == 0  # "a" is 61 00 in UTF-16LE, 00 61 in BE
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    if code == _ASCII:
        return body.decode("ascii", errors="replace")
    return body.decode("utf-8", errors="ignore").strip("\x00")


def read_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment of an open image as text, or None when it has none."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(raw, tuple):  # a BYTE-typed comment, as Pillow itself writes one
        raw = bytes(raw)
    if not isinstance(raw, bytes) or not raw:
        return None
    return decode_comment(raw) or None
