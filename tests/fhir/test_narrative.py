"""The R4 narrative allow-list (fhirbridge.fhir.narrative), without a server: what it refuses and what it keeps.
https://hl7.org/fhir/R4/narrative.html#xhtml"""
from __future__ import annotations

import pytest

from fhirbridge.fhir.narrative import narrative_problems

XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'


def div(body: str) -> str:
    return f"<div {XHTML}>{body}</div>"


@pytest.mark.parametrize("body, words", [
    ('<img src="x"/onerror=alert(1)>', "onerror"),
    ('<a href="&#106;avascript:alert(1)">x</a>', "javascript"),
    ('<a href="&#x6A;avascript:alert(1)">x</a>', "javascript"),
    ('<a href="java\tscript:alert(1)">x</a>', "javascript"),
    ('<a href="java&#9;script:alert(1)">x</a>', "javascript"),
    ('<a href=" &#0;javascript:alert(1)">x</a>', "not well-formed"),
    ('<a href="javascript&colon;alert(1)">x</a>', "javascript"),
    ('<a href="JaVaScRiPt:alert(1)">x</a>', "javascript"),
    ('<a href="vbscript:x">x</a>', "vbscript"),
    ('<a href="data:text/html;base64,PHNjcmlwdD4=">x</a>', "data"),
    ('<img src="data:image/svg+xml;base64,PHN2Zz4="/>', "data"),
    ('<a href="javascript:alert(1)//:x">x</a>', "javascript"),
    ('<a href="x:y">x</a>', "scheme 'x'"),
    ("<details/open/ontoggle=alert(1)>x</details>", "<details>"),
    ('<svg><set attributeName="href" to="javascript:alert(1)"/></svg>', "<svg>"),
    ('<p onclick="x()">x</p>', "onclick"),
    ('<p ONCLICK="x()">x</p>', "onclick"),
    ("<script>alert(1)</script>x", "<script>"),
    ("<style>p{}</style>x", "<style>"),
    ('<iframe src="https://e.example/"></iframe>x', "<iframe>"),
    ('<form action="https://e.example/"><input name="q"/></form>', "<form>"),
    ("<object>x</object>", "<object>"),
    ('<p style="background:url(https://tracker.example/p.gif)">x</p>', "style"),
    ('<p style="width:expression(alert(1))">x</p>', "style"),
    ('<p style="background:u\\72l(x)">x</p>', "style"),
    ('<p data-x="1">x</p>', "data-x"),
    ("<![CDATA[ x > <img src=x onerror=alert(1)> ]]>", "CDATA"),
    ("<!-- x --><p>x</p>", "comment"),
    ('<?x a="> <img src=x onerror=alert(1)>"?>x', "processing instruction"),
    ("<a\x00 onclick=alert(1)>x</a>", "not well-formed"),
    ('<h:img xmlns:h="http://www.w3.org/1999/xhtml" src="x"/>x', "prefix"),
    ('<x:p xmlns:x="urn:evil">x</x:p>', "namespace"),
    ("<P>x</P>", "<P>"),
    ("&nbsp;", "not well-formed"),
    ("<![iTrCx x", "cannot be read as HTML"),   # the HTML tokenizer raised here: refused, not a crash
])
def test_refused(body, words):
    problems = narrative_problems(div(body))
    assert problems, body
    assert any(words in p for p in problems), problems


def test_a_doctype_stops_the_parse_before_any_entity_is_expanded():
    bomb = ('<!DOCTYPE div [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            + div("&b;"))
    assert any("doctype" in p.lower() for p in narrative_problems(bomb))


@pytest.mark.parametrize("text, words", [
    ("<p>x</p>", "not a <div>"),
    ('<div xmlns="urn:other">x</div>', "not a <div>"),
    ("<div>x</div>", "not a <div>"),
    (div("   <p> </p>"), "txt-2"),
    (div("x") + "<p>after</p>", "not well-formed"),
    ("", "not a <div>"),
])
def test_root_and_content(text, words):
    assert any(words in p for p in narrative_problems(text)), narrative_problems(text)


@pytest.mark.parametrize("body", [
    "<p>Plain <b>bold</b> <i>i</i> <em>em</em> <strong>strong</strong> <br/> <sub>1</sub><sup>2</sup></p>",
    '<table border="1"><caption>c</caption><thead><tr><th scope="col">a</th></tr></thead>'
    '<tbody><tr><td colspan="2" rowspan="1">b</td></tr></tbody></table>',
    "<ul><li>a</li></ul><ol><li>b</li></ol><dl><dt>t</dt><dd>d</dd></dl>",
    '<a href="https://www.example.org/x?y=1&amp;z=2">link</a> <a href="http://example.org">old</a>',
    '<a href="#section-2">jump</a> <a name="section-2">here</a> <a href="other/page.html">rel</a>',
    '<img src="figure.png" alt="f"/> <img src="#contained-binary"/> <img src="//cdn.example/x.png"/>',
    '<img src="data:image/png;base64,iVBORw0KGgo="/> <img src="data:image/jpeg;base64,/9j/4A=="/>',
    '<span style="color: red; font-weight: bold" class="x" id="y" lang="en" xml:lang="en" title="t">x</span>',
    "<pre>a &lt; b &amp; c &gt; d</pre> <blockquote>q</blockquote> <code>c</code> <hr/>",
    '<h1>Title</h1><h2>Sub</h2><p>Ünïcødé ✓ text</p>',
    '<img src="https://www.example.org/scan.png"/>',
])
def test_ordinary_narrative_passes(body):
    assert narrative_problems(div(body)) == []


def test_the_generated_opinion_narrative_passes():
    from fhirbridge.exchange.opinion import field_html

    class F:
        kind, label = "qa", "Answers <to> the physician & co"
    html = field_html(F(), [{"question": "Is 'surgery' indicated?\nNow?", "answer": "Yes & no <b>"}])
    assert narrative_problems(div(html)) == []
