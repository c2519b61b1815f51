"""`--log-format json`: one JSON object per line, for log shippers.

Every record carries ``level`` and ``message`` (the same text the plain format
prints); a connection's end line also carries its fields as typed values
(``peer``, ``outcome``, ``wait_seconds``, ``run_seconds``, ``bytes_in``,
``bytes_out``, ...), passed as ``extra={"fields": {...}}``. No timestamp, as in
the plain format: journald and shippers stamp lines themselves.
"""

from __future__ import annotations

import json
import logging
from typing import Any

FIELDS_ATTR = "fields"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"level": record.levelname.lower(),
                               "message": record.getMessage()}
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                doc.setdefault(str(key), value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), default=str)
