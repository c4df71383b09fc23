"""The FHIR R4 narrative allow-list, and a checker that returns what a narrative breaks.

R4 narrative.html#xhtml: the narrative is an XHTML <div> that "SHALL contain only the basic html formatting
elements and attributes described in chapters 7-11 (except section 4 of chapter 9) and 12 (except elements
from chapter 12.1) of the HTML 4.0 standard, <a> elements (either name or href), images and internally
contained style attributes" (txt-1), and "SHALL have some non-whitespace content" (txt-2). The lists below
are those of the HL7 reference validator for txt-1.

A narrative is XML to FHIR but HTML to the browser an EHR shows it in. What one parser reads as text and the
other as markup (CDATA, comments, processing instructions, a stray NUL in a tag) is how sanitizers are
bypassed, so the checker reads it with both, strict XML (expat, no DTD) and the HTML tokenizer, and takes
the problems of either. Callers: loop/receive.py refuses an opinion whose narrative has any; the pages
(ui/sanitize.py) keep only elements of this list when they show one.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from html.parser import HTMLParser
from xml.parsers import expat

XHTML_NS = "http://www.w3.org/1999/xhtml"
_XML_NS = "http://www.w3.org/XML/1998/namespace"
_SEP = "\x01"

ELEMENTS = frozenset({
    "p", "br", "div", "h1", "h2", "h3", "h4", "h5", "h6", "a", "span", "b", "em", "i", "strong", "small", "big",
    "tt", "dfn", "q", "var", "abbr", "acronym", "cite", "blockquote", "hr", "address", "bdo", "kbd", "sub", "sup",
    "ul", "ol", "li", "dl", "dt", "dd", "pre", "table", "caption", "colgroup", "col", "thead", "tr", "tfoot",
    "tbody", "th", "td", "code", "samp", "img", "map", "area"})
VOID = frozenset({"br", "hr", "img", "col", "area"})   # the HTML elements of the list that have no content

# On every element: the HTML 4 core and i18n attributes, and those of tables.
ATTRIBUTES = frozenset({
    "title", "style", "class", "id", "lang", "xml:lang", "dir", "accesskey", "tabindex",
    "span", "width", "align", "valign", "char", "charoff", "abbr", "axis", "headers", "scope", "rowspan", "colspan"})
ELEMENT_ATTRIBUTES = {
    "a": frozenset({"href", "name", "charset", "type", "hreflang", "rel", "rev", "shape", "coords"}),
    "img": frozenset({"src", "alt", "longdesc", "height", "width", "usemap", "ismap", "border"}),
    "map": frozenset({"name"}),
    "area": frozenset({"shape", "coords", "href", "nohref", "alt"}),
    "blockquote": frozenset({"cite"}),
    "q": frozenset({"cite"}),
    "table": frozenset({"summary", "width", "border", "frame", "rules", "cellspacing", "cellpadding"}),
}
URL_ATTRIBUTES = frozenset({("a", "href"), ("area", "href"), ("img", "src"), ("img", "longdesc"),
                            ("img", "usemap"), ("blockquote", "cite"), ("q", "cite")})
SCHEMES = frozenset({"http", "https"})

# Browsers drop tabs and newlines anywhere in a URL and ignore leading controls: `java\tscript:` is javascript:.
# So every whitespace and control character goes before the scheme is read.
_INVISIBLE = re.compile(r"[\s\x00-\x20\x7f-\x9f]+")
_SCHEME = re.compile(r"([a-z][a-z0-9+.\-]*):")
# Inline raster images only: PNG, JPEG and GIF are decoded as pictures and can neither run script nor load
# anything (SVG can, so image/svg+xml is not here), and an inline image fetches nothing (no beacon).
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif);base64,[a-z0-9+/]*={0,2}\Z")
# R4 allows style attributes, but a style can load a URL (a tracking beacon in the chart) or, in old
# browsers, run script; CSS escapes and comments would hide either from this check, so they are refused too.
_BAD_STYLE = re.compile(r"\\|/\*|url\(|image\(|image-set\(|src\(|element\(|expression|javascript:|@import|"
                        r"behavior|binding")


def url_problem(url: str, *, image: bool = False) -> str | None:
    """Why a (decoded) href/src value is not allowed, or None: http(s), a relative or fragment reference, and
    for an image an inline PNG/JPEG/GIF."""
    plain = _INVISIBLE.sub("", url).lower()
    m = _SCHEME.match(plain)
    if m is None:
        # RFC 3986 §4.2: a relative reference's first segment has no colon; one that does is read as a scheme
        # by some parsers and as a path by others, so it is refused rather than guessed at.
        if ":" in re.split(r"[/?#]", plain, maxsplit=1)[0]:
            return "a reference with a colon before its first '/' is not allowed"
        return None
    if m.group(1) in SCHEMES:
        return None
    if image and _DATA_IMAGE.match(plain):
        return None
    return f"a URL with scheme '{m.group(1)}' is not allowed"


def _tag_problems(tag: str, attrs: Iterable[tuple[str, str | None]]) -> list[str]:
    if tag not in ELEMENTS:
        return [f"<{tag[:40]}> is not allowed"]
    problems = []
    for name, value in attrs:
        if name.lower().startswith("on"):
            problems.append(f"event attribute {name[:40]} on <{tag}> is not allowed")
        elif name not in ATTRIBUTES and name not in ELEMENT_ATTRIBUTES.get(tag, ()):
            problems.append(f"attribute {name[:40]} on <{tag}> is not allowed")
        elif (tag, name) in URL_ATTRIBUTES and (why := url_problem(value or "", image=(tag, name) == ("img", "src"))):
            problems.append(f"<{tag} {name}>: {why}")
        elif name == "style" and _BAD_STYLE.search(_INVISIBLE.sub("", value or "").lower()):
            problems.append(f"<{tag} style> may not load URLs, run expressions or use CSS escapes or comments")
    return problems


def _qualified(name: str) -> tuple[str, str, str]:
    """expat's "uri<SEP>local<SEP>prefix" (parts absent when there is none) as (uri, local, prefix)."""
    parts = name.split(_SEP)
    if len(parts) == 1:
        return "", name, ""
    return parts[0], parts[1], parts[2] if len(parts) > 2 else ""


class _Refused(Exception):
    pass


def _xml_problems(div: str) -> tuple[list[str], bool]:
    """The narrative read as XML (R4: the xhtml type is XML, only the XML entities, no DTD). Returns the
    problems and whether it has content (txt-2: non-whitespace text, or an image)."""
    problems: list[str] = []
    content = False
    depth = 0
    # Names come as "uri<SEP>local<SEP>prefix"; the separator is a character XML forbids, so no URI has it.
    parser = expat.ParserCreate(namespace_separator=_SEP)
    parser.namespace_prefixes = True

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth, content
        ns, local, prefix = _qualified(name)
        if depth == 0 and (ns, local, prefix) != (XHTML_NS, "div", ""):
            problems.append("the narrative is not a <div> in the XHTML namespace")
        depth += 1
        if ns != XHTML_NS:
            problems.append(f"<{local[:40]}> in namespace {ns[:80] or '(none)'} is not allowed")
        elif prefix:
            problems.append(f"the prefixed element {prefix[:20]}:{local[:40]} is not allowed")
        else:
            content = content or local == "img"
            named = []
            for key, value in attrs.items():
                attr_ns, attr, _ = _qualified(key)
                if not attr_ns:
                    named.append((attr, value))
                elif (attr_ns, attr) == (_XML_NS, "lang"):
                    named.append(("xml:lang", value))
                else:
                    problems.append(f"the attribute {attr[:40]} in namespace {attr_ns[:80]} is not allowed")
            problems.extend(_tag_problems(local, named))

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1

    def text(data: str) -> None:
        nonlocal content
        content = content or not data.isspace()

    def refuse(what: str):
        def handler(*_):
            raise _Refused(f"{what} is not allowed in a narrative")
        return handler

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    # A DTD could declare entities (an entity expansion bomb, external files): stop at its first sign.
    parser.StartDoctypeDeclHandler = refuse("a DOCTYPE")
    parser.EntityDeclHandler = refuse("an entity declaration")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.CommentHandler = refuse("a comment")
    parser.ProcessingInstructionHandler = refuse("a processing instruction")
    parser.StartCdataSectionHandler = refuse("a CDATA section")
    parser.XmlDeclHandler = refuse("an XML declaration")
    try:
        parser.Parse(div, True)
    except _Refused as exc:
        problems.append(str(exc))
    except expat.ExpatError as exc:
        problems.append(f"the narrative is not well-formed XHTML ({expat.ErrorString(exc.code)}, line {exc.lineno}"
                        f" column {exc.offset})")
    return problems, content


class _HtmlView(HTMLParser):
    """The narrative as a browser's HTML tokenizer sees it (names lowercased, every entity decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        # xmlns is an attribute to HTML; expat has checked its value.
        self.problems.extend(_tag_problems(tag, [(k, v) for k, v in attrs if k != "xmlns"]))

    def handle_comment(self, data):
        self.problems.append("a comment is not allowed in a narrative")

    def handle_decl(self, decl):
        self.problems.append("a declaration (DOCTYPE) is not allowed in a narrative")

    def unknown_decl(self, data):
        self.problems.append("a CDATA section or other declaration is not allowed in a narrative")

    def handle_pi(self, data):
        self.problems.append("a processing instruction is not allowed in a narrative")


def narrative_problems(div: str) -> list[str]:
    """What makes this Narrative.div break R4 txt-1/txt-2 or be unsafe to show; empty if nothing does. The
    problems name elements, attributes and URL schemes, never the narrative's text."""
    if not isinstance(div, str) or not div.strip():
        return ["the narrative is not a <div> (it is empty)"]
    xml_problems, content = _xml_problems(div)
    html = _HtmlView()
    try:
        html.feed(div)
        html.close()
    except AssertionError:  # the tokenizer gives up on some broken "<![" markup: refused, never a crash
        html.problems.append("the narrative cannot be read as HTML (a broken declaration)")
    problems = [*xml_problems, *html.problems]
    if not content and not problems:
        problems.append("the narrative has no content (txt-2)")
    return list(dict.fromkeys(problems))
