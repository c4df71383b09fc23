"""The opinion as a PDF: the rendering many EHR viewers show for a clinical note (issue 14).

`render_opinion_pdf(document)` lays out what `render.render_opinion(document, with_patient=False)` says as text:
the title, the reviewer, the date and status, then every section's heading and text, from the section's
generated narrative (the attested content, R4 documents.html) and, for a section without one, its coded
Observations. Like the text copy it names no patient: the note sits on the patient in the chart.

Three properties the write-back relies on:
- **Deterministic.** The same document gives the same bytes: no wall-clock time (CreationDate is the
  Composition's date), `/ID` the hash of the content (fpdf2's default, the PDF 1.7 §14.4 file identifier),
  a fixed Producer, and glyph subsets built in text order. A retried write carries the same content and hash.
  The bytes also depend on the fpdf2 release and the font files, so every replica runs the same image.
- **Any text a reviewer writes.** Text is embedded with a TrueType font (DejaVu Sans, from the system's
  fonts-dejavu-core) as Identity-H glyph ids, so `(`, `)`, `\\` and PDF operators in the text are only glyphs;
  CJK comes from Droid Sans Fallback when fonts-droid-fallback is installed. A character no font on this
  host can draw is shown as `[U+XXXX]`, never dropped unseen. Without any TrueType font the standard-14
  Helvetica (Latin-1) is used and everything outside Latin-1 is shown that way; a warning says so once.
- **No PHI in logs.** Nothing here logs the document or any of its text (fpdf2's own missing-glyph
  warnings cannot fire: every character is checked against the font before it is written).

The section narrative is read as data by a small parser (paragraphs, list items, line breaks, bold), never
handed to fpdf2's HTML renderer, which would follow `<img src>` and links.
"""
from __future__ import annotations

import copy
import functools
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

from fontTools.ttLib import TTFont
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from fhirbridge.exchange.render import terminal_safe
from fhirbridge.fhir.elements import concept_text

log = logging.getLogger(__name__)

# Where the fonts are on the systems fhirbridge runs on: Debian/Ubuntu (fonts-dejavu-core, a dependency of
# fontconfig, and installed by deploy/Dockerfile), Fedora/RHEL (dejavu-sans-fonts), Alpine (font-dejavu),
# Arch (ttf-dejavu). DejaVu's licence (Bitstream Vera + public domain) allows embedding.
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu-sans-fonts"),
             Path("/usr/share/fonts/dejavu"), Path("/usr/share/fonts/TTF"))
# CJK, which DejaVu lacks: Droid Sans Fallback (Debian fonts-droid-fallback, Apache-2.0), a plain TrueType
# file (Noto CJK ships as OpenType collections with CFF outlines, several MB per face to parse).
FALLBACK_FONT_FILES = (Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
                       Path("/usr/share/fonts/google-droid-sans-fonts/DroidSansFallbackFull.ttf"))

PAGE_MARGIN = 20          # mm, all sides (A4)
BODY_SIZE = 10.5          # pt
LINE = 5.2                # mm per body line
INDENT = 6                # mm per list level
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class PdfFonts:
    """The font files a rendering uses. `regular`/`bold` None: the standard-14 Helvetica (Latin-1 only)."""

    regular: Path | None = None
    bold: Path | None = None
    fallback: tuple[Path, ...] = ()


def find_fonts(dirs: tuple[Path, ...] = FONT_DIRS, fallback: tuple[Path, ...] = FALLBACK_FONT_FILES) -> PdfFonts:
    """DejaVu Sans (and Bold) from the first of `dirs` that has both, plus the fallback fonts that exist."""
    extra = tuple(p for p in fallback if p.is_file())
    for d in dirs:
        regular, bold = d / "DejaVuSans.ttf", d / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            return PdfFonts(regular, bold, extra)
    return PdfFonts(None, None, extra)


@functools.cache
def _cmap(path: Path) -> frozenset[int]:
    """The code points a font file can draw (read once per process)."""
    with TTFont(path, lazy=True) as font:
        return frozenset(font.getBestCmap())


@functools.cache
def _warn_no_font() -> None:
    log.warning("no DejaVu Sans font found in %s: the opinion PDF uses Helvetica (Latin-1), other characters are "
                "shown as [U+XXXX]; install fonts-dejavu-core", ", ".join(str(d) for d in FONT_DIRS))


# ---------------------------------------------------------------------------------------------------------
# The section narrative as blocks of runs

@dataclass
class Block:
    """One paragraph, list item or continuation line: runs of (bold, text) at a list depth."""

    depth: int = 0
    bullet: bool = False
    cont: bool = False     # a line break's continuation of the block before it
    runs: list[tuple[bool, str]] = field(default_factory=list)

    def text(self) -> str:
        return "".join(t for _, t in self.runs)


_BLOCK_TAGS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "pre", "blockquote"}
_BOLD_TAGS = {"b", "strong", "th", "h1", "h2", "h3", "h4", "h5", "h6"}


class _Narrative(HTMLParser):
    """XHTML narrative → blocks. Markup is structure only: every character of text is kept, nothing is fetched."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.depth = 0      # list nesting
        self.bold = 0
        self.current: Block | None = None

    def _close(self) -> None:
        if self.current is not None and self.current.text().strip():
            self.blocks.append(self.current)
        self.current = None

    def _open(self, *, bullet: bool = False) -> Block:
        self._close()
        self.current = Block(depth=self.depth, bullet=bullet)
        return self.current

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("ul", "ol"):
            self._close()
            self.depth += 1
        elif tag == "li":
            self._open(bullet=True)
        elif tag == "br":
            # The next line of the same paragraph or item: aligned with its text, under a bullet's text.
            self._open().cont = True
        elif tag in _BLOCK_TAGS:
            self._open()
        elif tag in ("td", "th") and self.current is not None and self.current.runs:
            self.current.runs.append((False, "   "))
        if tag in _BOLD_TAGS:
            self.bold += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _BOLD_TAGS:
            self.bold = max(0, self.bold - 1)
        if tag in ("ul", "ol"):
            self._close()
            self.depth = max(0, self.depth - 1)
        elif tag == "li":
            self._close()
        elif tag in _BLOCK_TAGS:
            self._close()

    def handle_startendtag(self, tag: str, attrs) -> None:
        self.handle_starttag(tag, attrs)
        if tag != "br":
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        # Whitespace collapses as in HTML (a newline in the source is a space; <br/> is the line break).
        text = re.sub(r"\s+", " ", data)
        if not text.strip() and self.current is None:
            return
        if self.current is None:
            self._open()
        assert self.current is not None
        if not self.current.runs:
            text = text.lstrip()
        if text:
            self.current.runs.append((self.bold > 0, text))


def narrative_blocks(div: str) -> list[Block]:
    parser = _Narrative()
    parser.feed(div)
    parser.close()
    parser._close()
    for b in parser.blocks:
        if b.runs:    # no trailing space before the line's end
            bold, last = b.runs[-1]
            b.runs[-1] = (bold, last.rstrip())
    return parser.blocks


# ---------------------------------------------------------------------------------------------------------
# Text the fonts can draw

# Bidirectional embeddings, overrides and isolates (Unicode UAX #9): invisible, and in a viewer that applies
# them they reorder the text around them ("Trojan Source", CVE-2021-42574). The PDF places glyphs in the order
# written, so they would change nothing here but could in a copy-paste: shown as codes, like a missing glyph.
_SHOWN_AS_CODE = frozenset([*range(0x202A, 0x202F), *range(0x2066, 0x206A)])


class _Glyphs:
    """Makes text drawable: control characters removed (as for the terminal), tabs as spaces, and every
    character that neither the style's font nor a fallback font has shown as [U+XXXX]."""

    def __init__(self, fonts: PdfFonts):
        fallback = frozenset().union(*(_cmap(p) for p in fonts.fallback)) if fonts.fallback else frozenset()
        if fonts.regular is not None and fonts.bold is not None:
            self.covered = {False: _cmap(fonts.regular) | fallback, True: _cmap(fonts.bold) | fallback}
        else:
            latin1 = frozenset(range(0x20, 0x7F)) | frozenset(range(0xA0, 0x100))
            self.covered = {False: latin1, True: latin1}

    def __call__(self, text: str, bold: bool = False) -> str:
        covered = self.covered[bold]
        text = terminal_safe(text).replace("\t", "    ").replace("\n", " ")
        return "".join(c if ord(c) in covered and ord(c) not in _SHOWN_AS_CODE else f"[U+{ord(c):04X}]"
                       for c in text)


# ---------------------------------------------------------------------------------------------------------
# The layout

class _OpinionPdf(FPDF):
    def __init__(self, fonts: PdfFonts, glyphs: _Glyphs, footer_title: str):
        super().__init__(format="A4", unit="mm")
        # The page total comes from a first pass (`render_opinion_pdf`), not from fpdf2's "{nb}" alias, which
        # would also replace "{nb}" written by the reviewer.
        self.alias_nb_pages("")    # "": no alias (fpdf2 tests it for truth)
        self.total_pages: int | None = None    # None: the counting pass, no footer
        self.glyphs = glyphs
        self.footer_title = footer_title
        self.set_margins(PAGE_MARGIN, PAGE_MARGIN, PAGE_MARGIN)
        self.set_auto_page_break(True, margin=PAGE_MARGIN)
        if fonts.regular is not None and fonts.bold is not None:
            self.add_font("body", "", fonts.regular)
            self.add_font("body", "B", fonts.bold)
            names = []
            for i, path in enumerate(fonts.fallback):
                self.add_font(f"fallback{i}", "", path)
                names.append(f"fallback{i}")
            if names:
                # A fallback has no bold face: use its regular one for bold text rather than no glyph at all.
                self.set_fallback_fonts(names, exact_match=False)
            self.body_family = "body"
        else:
            self.body_family = "helvetica"

    def use_font(self, size: float, bold: bool = False) -> None:
        self.set_font(self.body_family, "B" if bold else "", size)

    def footer(self) -> None:
        if self.total_pages is None:
            return
        self.set_y(-PAGE_MARGIN + 6)
        self.use_font(8)
        self.set_text_color(90)
        self.cell(0, 4, self.glyphs(f"{self.footer_title} - page {self.page_no()} of {self.total_pages}"),
                  align="C")
        self.set_text_color(0)

    def paragraph(self, runs: list[tuple[bool, str]], *, left: float, size: float = BODY_SIZE,
                  height: float = LINE, bullet: bool = False) -> None:
        """A paragraph of runs starting at `left`, wrapped at words (a word longer than the line is broken
        between characters), continuing lines at `left`."""
        self.set_left_margin(left)
        self.set_x(left)
        if bullet:
            self.use_font(size)
            self.set_x(left - INDENT + 1.5)
            self.cell(INDENT - 1.5, height, self.glyphs("-"))
            self.set_x(left)
        for bold, text in runs:
            self.use_font(size, bold)
            self.write(height, self.glyphs(text, bold))
        self.ln(height)
        self.set_left_margin(PAGE_MARGIN)


def _list(value) -> list:
    """`value` if it is a list, else none: the document came from outside, and a bad shape draws nothing."""
    return value if isinstance(value, list) else []


def _entries(document: dict) -> list[dict]:
    return [e["resource"] for e in _list(document.get("entry"))
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def _creation_date(comp: dict, document: dict) -> datetime:
    """CreationDate from the document itself (never the clock): the Composition's date, else the Bundle's
    timestamp, else a fixed date."""
    for value in (comp.get("date"), document.get("timestamp")):
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                continue
            return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    return _EPOCH


def _concept(value) -> str:
    return concept_text(value) if isinstance(value, dict) else ""


def _observation_lines(section: dict, by_ref: dict[str, dict]) -> list[Block]:
    out = []
    for ref in _list(section.get("entry")):
        obs = by_ref.get(str(ref.get("reference", ""))) if isinstance(ref, dict) else None
        if not obs:
            continue
        q = obs.get("valueQuantity")
        value = (f"{q.get('value')} {q.get('unit', '')}".strip() if isinstance(q, dict)
                 else _concept(obs.get("valueCodeableConcept")) or str(obs.get("valueString", "")))
        out.append(Block(runs=[(True, f"{_concept(obs.get('code'))}: "), (False, value)]))
    return out


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _needed(document: dict, fonts: PdfFonts) -> PdfFonts:
    """`fonts` with only the fallback fonts this document needs: parsing Droid Sans Fallback (28,000 glyphs)
    takes fpdf2 about 0.4 s a pass, for the few opinions that have CJK text. Decided from the document alone,
    so the same document always gets the same fonts and bytes."""
    if fonts.regular is None or fonts.bold is None or not fonts.fallback:
        return fonts
    # What the layout can show: the Composition, the reviewer Organization and the Observations (not the
    # Patient, which is left out, nor the signature).
    shown = [r for r in _entries(document) if r.get("resourceType") in ("Composition", "Organization", "Observation")]
    chars = {ord(c) for s in _strings(shown) for c in s}
    missing = chars - (_cmap(fonts.regular) & _cmap(fonts.bold))
    return PdfFonts(fonts.regular, fonts.bold, tuple(p for p in fonts.fallback if missing & _cmap(p)))


def _composition(document: dict) -> dict:
    entries = _entries(document)
    return entries[0] if entries and entries[0].get("resourceType") == "Composition" else {}


def _layout(pdf: _OpinionPdf, document: dict) -> None:
    entries = _entries(document)
    comp = _composition(document)
    title = str(comp.get("title") or "Second opinion")
    glyphs = pdf.glyphs
    author = next((str(r.get("name", "")) for r in entries if r.get("resourceType") == "Organization"), "")
    by_ref = {}
    for e in _list(document.get("entry")):
        if isinstance(e, dict) and isinstance(e.get("resource"), dict):
            r = e["resource"]
            by_ref[str(e.get("fullUrl", ""))] = r
            by_ref[f"{r.get('resourceType')}/{r.get('id')}"] = r
    pdf.set_title(glyphs(title))
    pdf.set_producer("fhirbridge")
    pdf.set_creation_date(_creation_date(comp, document))
    pdf.add_page()
    pdf.use_font(18, True)
    pdf.multi_cell(0, 9, glyphs(title, True), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    for label, value in (("Reviewer", author), ("Date", str(comp.get("date", ""))),
                         ("Status", str(comp.get("status", "")))):
        pdf.paragraph([(True, f"{label}: "), (False, value)], left=PAGE_MARGIN)
    pdf.ln(2)
    pdf.set_draw_color(150)
    pdf.line(PAGE_MARGIN, pdf.get_y(), pdf.w - PAGE_MARGIN, pdf.get_y())
    pdf.ln(4)
    for s in _list(comp.get("section")):
        if not isinstance(s, dict):
            continue
        pdf.use_font(13, True)
        pdf.multi_cell(0, 7, glyphs(str(s.get("title", "")), True), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(1)
        div = s.get("text", {}).get("div", "") if isinstance(s.get("text"), dict) else ""
        blocks = narrative_blocks(div) if isinstance(div, str) and div else []
        blocks = blocks or _observation_lines(s, by_ref)
        if not blocks and isinstance(s.get("emptyReason"), dict):
            blocks = [Block(runs=[(False, f"(empty: {_concept(s['emptyReason'])})")])]
        for i, b in enumerate(blocks):
            if i and b.depth == 0 and not (b.bullet or b.cont):
                pdf.ln(1.2)    # between paragraphs, not between the lines of one
            pdf.paragraph(b.runs, left=PAGE_MARGIN + INDENT * b.depth, bullet=b.bullet)
        pdf.ln(5)


def render_opinion_pdf(document: dict, *, fonts: PdfFonts | None = None) -> bytes:
    """The opinion document Bundle as PDF bytes; the same document (and fonts) always gives the same bytes.
    `fonts` defaults to what `find_fonts` finds on this host."""
    fonts = _needed(document, fonts or find_fonts())
    if fonts.regular is None:
        _warn_no_font()
    title = str(_composition(document).get("title") or "Second opinion")
    pdf = _OpinionPdf(fonts, _Glyphs(fonts), title)
    # Two passes: the first counts the pages, the second prints "page n of N" in each footer (the footer sits
    # in the bottom margin, so it moves nothing and both passes break pages alike). The counting pass runs on
    # a copy, which shares the parsed fonts (fpdf2 parses a font in about 0.1 s; the copy takes none of it).
    probe = copy.deepcopy(pdf)
    _layout(probe, document)
    pdf.total_pages = probe.pages_count
    _layout(pdf, document)
    return bytes(pdf.output())
