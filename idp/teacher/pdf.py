"""Sign-in cards as a PDF (fpdf2): eight cards to an A4 page, each with the student's
name, login, activation code, expiry and a QR code to the activation page.

The text is set in a TrueType font embedded in the file (settings ``card_font_file``,
DejaVu Sans by default: Latin, Cyrillic and the Kyrgyz letters ң, ө, ү), so names
print whatever the reader's computer has. No Flask here: the view passes the
translated labels."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from datetime import datetime

import segno
from fpdf import FPDF

FONT = "CardFont"
# A4 in millimetres: two columns of four cards.
PAGE_W, PAGE_H = 210.0, 297.0
MARGIN = 10.0
COLUMNS, ROWS = 2, 4
GAP_X, GAP_Y = 10.0, 5.0
CARD_W = (PAGE_W - 2 * MARGIN - (COLUMNS - 1) * GAP_X) / COLUMNS
CARD_H = (PAGE_H - 2 * MARGIN - (ROWS - 1) * GAP_Y) / ROWS
QR_SIZE = 30.0
PAD = 4.0


class FontMissing(Exception):
    """The configured TTF font file cannot be read."""


@dataclass(frozen=True)
class Card:
    name: str
    login: str
    code: str
    expires: datetime
    url: str
    instructions: str


@dataclass(frozen=True)
class Labels:
    title: str
    login: str
    code: str
    valid_until: str


def check_font(font_file: str) -> None:
    """Raise ``FontMissing`` unless ``font_file`` is a readable file."""
    if not font_file or not os.path.isfile(font_file) or not os.access(font_file, os.R_OK):
        raise FontMissing(font_file)


def _qr_png(url: str) -> io.BytesIO:
    out = io.BytesIO()
    segno.make(url, error="m").save(out, kind="png", scale=8, border=2)
    out.seek(0)
    return out


def render_cards(cards: list[Card], labels: Labels, *, font_file: str) -> bytes:
    """The PDF; raises ``FontMissing`` when the font cannot be used."""
    check_font(font_file)
    pdf = FPDF(orientation="portrait", unit="mm", format="A4")
    pdf.set_auto_page_break(auto=False)
    pdf.set_title(labels.title)
    pdf.set_creator("Darbaza")
    try:
        pdf.add_font(FONT, "", font_file)
    except Exception as exc:  # a file that is not a usable TrueType font
        raise FontMissing(font_file) from exc
    per_page = COLUMNS * ROWS
    text_w = CARD_W - QR_SIZE - 3 * PAD
    for index, card in enumerate(cards):
        if index % per_page == 0:
            pdf.add_page()
        slot = index % per_page
        x = MARGIN + (slot % COLUMNS) * (CARD_W + GAP_X)
        y = MARGIN + (slot // COLUMNS) * (CARD_H + GAP_Y)
        pdf.set_draw_color(90, 90, 90)
        pdf.set_dash_pattern(dash=1.5, gap=1.5)
        pdf.rect(x, y, CARD_W, CARD_H)
        pdf.set_dash_pattern()
        pdf.set_xy(x + PAD, y + PAD)
        pdf.set_font(FONT, size=12)
        pdf.multi_cell(CARD_W - 2 * PAD, 5.5, card.name, new_x="LMARGIN", new_y="NEXT", max_line_height=5.5)
        top = max(pdf.get_y(), y + PAD + 6) + 1
        pdf.set_font(FONT, size=9)
        pdf.set_xy(x + PAD, top)
        pdf.cell(text_w, 4.5, labels.login, new_x="LEFT", new_y="NEXT")
        pdf.set_font(FONT, size=12)
        pdf.cell(text_w, 6, card.login, new_x="LEFT", new_y="NEXT")
        pdf.set_font(FONT, size=9)
        pdf.cell(text_w, 4.5, labels.code, new_x="LEFT", new_y="NEXT")
        pdf.set_font(FONT, size=13)
        pdf.cell(text_w, 6.5, card.code, new_x="LEFT", new_y="NEXT")
        pdf.set_font(FONT, size=8)
        pdf.cell(text_w, 4.5, f"{labels.valid_until} {card.expires.strftime('%Y-%m-%d')}", new_x="LEFT", new_y="NEXT")
        pdf.image(_qr_png(card.url), x=x + CARD_W - PAD - QR_SIZE, y=top, w=QR_SIZE, h=QR_SIZE)
        pdf.set_font(FONT, size=7)
        pdf.set_xy(x + PAD, y + CARD_H - PAD - 11)
        pdf.multi_cell(CARD_W - 2 * PAD, 3.3, card.instructions, max_line_height=3.3)
    if not cards:
        pdf.add_page()
    return bytes(pdf.output())
