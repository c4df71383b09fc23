"""The pages' narrative sanitizer keeps only text-structure elements of the one R4 allow-list (fhir/narrative.py)
and drops every attribute; no browser needed."""
from __future__ import annotations

from fhirbridge.fhir import narrative
from fhirbridge.ui.sanitize import KEEP, safe_xhtml


def test_the_pages_keep_a_subset_of_the_r4_allow_list():
    assert KEEP <= narrative.ELEMENTS
    assert not KEEP & {"a", "img", "map", "area"}


def test_attributes_links_images_and_scripts_are_dropped():
    html = safe_xhtml('<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="x()" style="color:red">a<br/>b</p>'
                      '<a href="javascript:alert(1)">link</a><img src="x" onerror="alert(1)"/><u>u</u>'
                      "<script>alert(1)</script><table><tr><td>1</td></tr></table></div>")
    assert str(html) == "<div><p>a<br>b</p>linku<table><tr><td>1</td></tr></table></div>"
