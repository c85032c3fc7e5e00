"""Showing a login's QR code: an SVG for the admin, text for a terminal, a file for a picture.

The upstream's ``data.qrcode`` is either text to encode (a URL) or a ready ``data:image`` picture
(``tokens.clients.normalize_qrcode`` checked it). Encoding is done here with segno, on the server:
no JavaScript library, no CDN.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import segno

BORDER = 4  # the quiet zone a scanner needs
_DARK_ON_LIGHT = "\x1b[30;107m"  # black on bright white, whatever the terminal's colours
_RESET = "\x1b[0m"


class QrRenderError(ValueError):
    """The QR content cannot be shown (too long to encode, or a broken picture)."""


def is_picture(qrcode: str) -> bool:
    return qrcode.startswith("data:image/")


def _make(text: str) -> segno.QRCode:
    try:
        return segno.make(text, error="m", micro=False)
    except (segno.DataOverflowError, ValueError) as exc:
        raise QrRenderError(str(exc)) from None


def qr_svg(text: str) -> str:
    """The QR code of ``text`` as an inline ``<svg>`` (markup segno wrote: safe to embed) that takes
    the size the page gives it."""
    return _make(text).svg_inline(omitsize=True, border=BORDER, dark="#000", light="#fff")


def qr_terminal(text: str, *, color: bool) -> str:
    """The QR code of ``text`` in half-block characters, two modules per character cell.

    With ``color`` the colours are set explicitly (dark modules black, light ones white), so the
    code scans on light and dark terminal themes alike; without it (a file, a pipe) light
    modules are the drawn blocks, which suits the usual dark terminal."""
    qr = _make(text)
    if not color:
        out = io.StringIO()
        qr.terminal(out=out, compact=True, border=BORDER)
        return out.getvalue()
    rows = [list(row) for row in qr.matrix_iter(border=BORDER)]
    if len(rows) % 2:
        rows.append([0] * len(rows[0]))
    lines = []
    for top, bottom in zip(rows[0::2], rows[1::2], strict=True):
        # "▀" in the foreground colour (black) marks a dark top module, the background (white)
        # shows through for light ones; choose the glyph per cell to draw both halves.
        cells = []
        for upper, lower in zip(top, bottom, strict=True):
            cells.append({(1, 1): "█", (1, 0): "▀", (0, 1): "▄", (0, 0): " "}[(bool(upper), bool(lower))])
        lines.append(_DARK_ON_LIGHT + "".join(cells) + _RESET)
    return "\n".join(lines) + "\n"


def picture_bytes(data_uri: str) -> tuple[bytes, str]:
    """The bytes of a ``data:image/<kind>;base64,...`` picture and a file extension for it."""
    header, _, payload = data_uri.partition(",")
    kind = header.removeprefix("data:image/").split(";")[0].lower() or "png"
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise QrRenderError("the QR picture is not valid base64") from None
    return raw, {"jpeg": "jpg"}.get(kind, kind)


def save_picture(data_uri: str, *, folder: Path, stem: str) -> Path:
    """Write a ``data:image`` picture to ``folder/stem.<ext>`` (created, readable by us only)."""
    raw, extension = picture_bytes(data_uri)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.{extension}"
    path.write_bytes(raw)
    path.chmod(0o600)
    return path
