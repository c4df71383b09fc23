"""sekmet's workflows run inside the test process instead of as `sekmet workflow run` processes.

Seeding one patient is nine workflows; as processes each paid ~0.8 s of interpreter start and imports, which
made seeding 9 s and, over the suite's dozens of seeded patients, minutes of CI. In process a workflow takes
milliseconds. It does what the CLI command does (sekmet/cli.py `wf_run`): a fresh AppContext on the server's
settings and database, the workflow against the "local" target, the result as JSON; then, as the process's
exit would, it waits for the notifications the write queued and closes the database. The server, a separate
process on the same SQLite file, sees the writes as it saw those of the CLI.

Only tests use this: src/fhirbridge/demo/localehr.py keeps sekmet out of fhirbridge's own interpreter.
"""
from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

from fhirbridge.demo.localehr import LocalEhr
from fhirbridge.errors import FhirbridgeError

# sekmet keeps its settings in a module global its server code reads: one workflow at a time, whatever the
# number of test servers.
_LOCK = threading.Lock()


def run_in_process(ehr: LocalEhr) -> None:
    """Make `ehr.workflow` run in this process (a no-op result change: the same JSON as the CLI prints)."""
    config = importlib.import_module("sekmet.config")
    context = importlib.import_module("sekmet.context")
    registry = importlib.import_module("sekmet.workflows.registry")
    settings_path = Path(ehr.settings_path)

    def run(key: str, args: dict[str, str]) -> dict:
        with _LOCK:
            # The settings file is JSON (localehr writes it so), read as the CLI would without the
            # environment overrides localehr strips for its processes.
            settings = config.Settings.model_validate(json.loads(settings_path.read_text()))
            config.set_settings(settings)
            ctx = context.AppContext(settings)
            try:
                out = registry.run_workflow(ctx, key, "local", args)
            except Exception as exc:   # the CLI's non-zero exit: FhirbridgeError with the reason
                raise FhirbridgeError(f"sekmet workflow {key} failed: {exc}") from exc
            finally:
                ctx.subscriptions.pool.shutdown(wait=True)
                ctx.store.conn.close()
        return json.loads(json.dumps(out))     # a copy, JSON types only, as parsed from the CLI's output

    ehr.workflow_runner = run
