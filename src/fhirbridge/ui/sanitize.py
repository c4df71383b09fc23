"""Reviewer-written narrative (FHIR XHTML) made safe to put in our pages.

loop/receive.py already refuses narrative with scripts, forms, frames or event attributes (R4 txt-1/txt-2), and
the pages' Content-Security-Policy forbids inline script; this is the third line: only plain text-structure
elements are kept, every attribute is dropped, everything else is escaped text.
"""
from __future__ import annotations

from html import escape
from html.parser import HTMLParser

from markupsafe import Markup

KEEP = {"p", "br", "b", "strong", "i", "em", "u", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td",
        "caption", "span", "div", "sub", "sup", "code", "pre", "blockquote", "h3", "h4", "h5", "h6", "dl", "dt", "dd"}
VOID = {"br"}
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
