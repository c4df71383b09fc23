"""gunicorn's own lines (error log, access log) in the same format as fhirbridge's (ops.logs)."""
from __future__ import annotations

from gunicorn.glogging import Logger

from fhirbridge.ops.logs import TextFormatter, formatter


class GunicornLogger(Logger):
    """gunicorn's own lines (error log, access log) in the same format as ours (gunicorn_conf.logger_class)."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    stream = getattr(handler, "stream", None)
                    fmt = formatter(stream=stream)
                    if isinstance(fmt, TextFormatter) and log is self.access_log:
                        continue  # on a terminal gunicorn's own access line reads best
                    handler.setFormatter(fmt)
