"""cli: the `fhirbridge` command. `main.py` builds the parser and dispatches; one module per command group
(`cases`: order, run, status, receive, retry, cancel, audit; `reviewer`; `keys`; `service`: serve,
worker, subscribe; `setup`: init, doctor, db, demo), each with `add_parsers(sub)` and its `cmd_*` functions.

Rule: the top layer. It may import every other layer; nothing imports it. A command parses arguments,
calls one function of a lower layer and prints; no loop logic lives here.
"""
