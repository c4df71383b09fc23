"""Reviewer-written narrative (FHIR XHTML) made safe to put in our pages.

loop/receive.py already refuses narrative outside the R4 allow-list (fhir/narrative.py, txt-1/txt-2), and the
pages' Content-Security-Policy forbids inline script; this is the third line, for whatever reaches a page: only
elements of that same allow-list that structure text are kept, every attribute is dropped, everything else is
escaped text.
"""
from __future__ import annotations

from html import escape
from html.parser import HTMLParser

from markupsafe import Markup

from fhirbridge.fhir import narrative

# Not links, images or image maps (without their attributes they would be empty, and a page of ours never
# follows or loads what an opinion points at), nor h1/h2 (the page's own headings).
KEEP = narrative.ELEMENTS - {"a", "img", "map", "area", "h1", "h2"}
VOID = narrative.VOID & KEEP
DROP_CONTENT = {"script", "style", "iframe", "object", "embed", "template", "title", "head"}


class _Clean(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.open: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in DROP_CONTENT:
            self.skip += 1
        elif not self.skip and tag in KEEP:
            self.out.append(f"<{tag}>")
            if tag not in VOID:
                self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        if not self.skip and tag in VOID:
            self.out.append(f"<{tag}>")

    def handle_endtag(self, tag):
        if tag in DROP_CONTENT:
            self.skip = max(0, self.skip - 1)
        elif not self.skip and tag in self.open:
            while self.open:             # close what was left open inside it
                top = self.open.pop()
                self.out.append(f"</{top}>")
                if top == tag:
                    break

    def handle_data(self, data):
        if not self.skip:
            self.out.append(escape(data, quote=False))


def safe_xhtml(div: str) -> Markup:
    parser = _Clean()
    parser.feed(div or "")
    parser.close()
    return Markup("".join(parser.out) + "".join(f"</{t}>" for t in reversed(parser.open)))
