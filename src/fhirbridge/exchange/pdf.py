"""PLACEHOLDER until helper "pdf" lands the real renderer (issue 14): the signature the write-back is written
against. The lead's merge replaces this file; nothing selects PDF until then (tests do not pin it)."""
from __future__ import annotations


def render_opinion_pdf(document: dict) -> bytes:
    """The opinion document rendered as a PDF (deterministic bytes for the same document)."""
    raise NotImplementedError("the PDF rendering of the opinion is not available in this build")
