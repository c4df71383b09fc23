"""The layout keeps its rules (docs/architecture.md §0): checked over the source, failing closed.

The layer contract itself is import-linter's (`lint-imports`, a gate of .ci/run); these are the rules it
does not express.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fhirbridge"
ROOT_MODULES = {"__init__.py", "__main__.py", "errors.py", "jsonutil.py", "steps.py"}
# Imports left inside a function on purpose, each with the reason in a comment on the line above.
LAZY_IMPORTS = {("fhir/validate.py", "fhir.resources.R4B")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("mappings/") or "/versions/" in rel:
            continue
        yield rel, ast.parse(path.read_text(), filename=rel)


def test_the_package_root_holds_only_what_every_layer_shares():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES


def test_every_folder_states_what_it_is_and_the_rule_it_keeps():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        if init.parent.name == "mappings":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Rule:" in doc, f"{init.relative_to(PACKAGE)} does not state its rule"


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fhirbridge"):
                offenders += [f"{rel}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_imports_sit_at_the_top_unless_one_is_lazy_on_purpose():
    inside = []
    for rel, tree in _modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        if (rel, name) not in LAZY_IMPORTS:
                            inside.append(f"{rel}:{node.lineno} {name}")
    assert inside == []


def test_the_loop_and_the_foundations_never_import_the_web_framework():
    # import-linter enforces this too; here it fails in the suite, before anyone reads the gate's output.
    web = ("flask", "werkzeug", "gunicorn", "fhirbridge.service", "fhirbridge.ui", "fhirbridge.cli")
    offenders = []
    for rel, tree in _modules():
        if rel == "__main__.py" or rel.split("/")[0] in ("service", "ui", "cli", "demo"):
            continue
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] in web or n.startswith(web)]
    assert offenders == []
