"""Test helpers: a CLI result's one ``error:`` line and its one JSON document."""

from __future__ import annotations

import json


def one_json(result):
    """stdout is exactly one JSON document."""
    doc, end = json.JSONDecoder().raw_decode(result.stdout.strip())
    assert end == len(result.stdout.strip()), result.stdout
    return doc


def error_line(result) -> str:
    """The one ``error:`` line of a failed command (no traceback)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]
