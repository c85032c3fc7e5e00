"""Showing a QR code: the terminal rendering is the code's own matrix, the SVG is inline, a
picture is saved as itself."""

from __future__ import annotations

import pytest
import segno

from tokens.qrcodes import BORDER, QrRenderError, picture_bytes, qr_svg, qr_terminal, save_picture

URL = "https://p.baominggongju.com/fake-login?scene=0123456789abcdef"
GLYPHS = {"█": (1, 1), "▀": (1, 0), "▄": (0, 1), " ": (0, 0)}


def test_the_coloured_terminal_code_is_the_qr_matrix_black_on_white():
    lines = qr_terminal(URL, color=True).splitlines()
    assert all(line.startswith("\x1b[30;107m") and line.endswith("\x1b[0m") for line in lines)
    cells = [line.removeprefix("\x1b[30;107m").removesuffix("\x1b[0m") for line in lines]
    decoded = []
    for row in cells:
        pairs = [GLYPHS[char] for char in row]
        decoded += [[top for top, _ in pairs], [bottom for _, bottom in pairs]]
    matrix = [[int(bool(module)) for module in row] for row in segno.make(URL, error="m").matrix_iter(border=BORDER)]
    assert decoded[: len(matrix)] == matrix
    assert all(not any(row) for row in decoded[len(matrix) :])  # the padding row, if any, is light


def test_the_plain_terminal_code_has_no_escape_sequences():
    text = qr_terminal(URL, color=False)
    assert "\x1b" not in text and "▀" in text


def test_svg_is_inline_and_scales():
    svg = qr_svg(URL)
    assert svg.startswith("<svg") and "viewBox" in svg and "width=" not in svg.split(">", 1)[0]
    assert "<script" not in svg


def test_too_much_text_is_a_render_error():
    with pytest.raises(QrRenderError):
        qr_svg("中" * 2000)


def test_a_picture_is_saved_as_itself(tmp_path):
    data_uri = segno.make(URL).png_data_uri()
    raw, extension = picture_bytes(data_uri)
    path = save_picture(data_uri, folder=tmp_path / "qr", stem="login")
    assert (path.name, path.read_bytes(), extension) == ("login.png", raw, "png")
    assert path.stat().st_mode & 0o777 == 0o600
    assert picture_bytes("data:image/jpeg;base64,/9j/4AAQ")[1] == "jpg"
    with pytest.raises(QrRenderError):
        picture_bytes("data:image/png;base64,@@@")
