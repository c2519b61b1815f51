"""--log-format json: one object per line, the end line's fields typed."""

from __future__ import annotations

import json
import logging

from gatekeeper import cli
from gatekeeper.job import Job
from gatekeeper.net.copy import Transfer
from gatekeeper.observe.logformat import JsonFormatter
from gatekeeper.outcome import Outcome


def test_end_line_fields_are_typed_and_match_the_text() -> None:
    record = Job(peer="10.0.0.7:51234", accepted=10.0, outcome=Outcome.OK,
                 admitted=13.12, ended=54.122, estimate=2**28)
    record.transfer = Transfer()
    record.transfer.to_backend, record.transfer.to_client = 2318841, 55120
    log_record = logging.LogRecord("gatekeeper", logging.INFO, __file__, 1, "%s",
                                   (record.line(),), None)
    log_record.fields = record.fields()
    doc = json.loads(JsonFormatter().format(log_record))
    assert doc["level"] == "info" and doc["message"] == record.line()
    assert doc["event"] == "end" and doc["peer"] == "10.0.0.7:51234" and doc["outcome"] == "ok"
    assert doc["wait_seconds"] == 3.12 and doc["run_seconds"] == 41.002
    assert doc["bytes_in"] == 2318841 and doc["bytes_out"] == 55120
    assert doc["estimate_bytes"] == 2**28 and "reason" not in doc and "pid" not in doc


def test_plain_records_and_a_bad_flag() -> None:
    plain = logging.LogRecord("gatekeeper", logging.WARNING, __file__, 1, "a %s\nb", ("x",), None)
    assert json.loads(JsonFormatter().format(plain)) == {"level": "warning", "message": "a x\nb"}
    assert cli.parse_options(["--log-format", "json"]).log_format == "json"
    assert cli.main(["--log-format", "xml"]) == 2
