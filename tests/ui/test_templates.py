"""Every page template compiles, without a browser: a tag left open by a merge fails here, in a second, rather
than as a page that never renders in the browser tests (which skip where Chromium is absent)."""
from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

import fhirbridge.ui

ROOT = Path(fhirbridge.ui.__file__).parent / "templates"
TEMPLATES = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.html"))


def test_the_templates_are_found():
    assert "physician/case.html" in TEMPLATES and "base.html" in TEMPLATES


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_template_compiles(name):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROOT), autoescape=True)
    env.get_template(name)      # raises TemplateSyntaxError with the line of an unclosed or stray tag
