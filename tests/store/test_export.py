"""``pipeline.store.export``: a result folder into one ``.npy`` / ``.npz`` file."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline.store.export as export_mod
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from tests.clitools import error_line
from tests.store.results import write_result


def _terminated_mid_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to this process once the temporary file is half written."""
    real = export_mod._write_npy

    def write_then_sigterm(result, path):
        real(result, path)
        assert path.exists()  # the temp file is there when the signal comes
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(export_mod, "_write_npy", write_then_sigterm)


def test_sigterm_during_export_is_one_line_exit_143_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, dest = tmp_path / "out", tmp_path / "dest" / "J.npy"
    write_result(str(out))
    before = signal.getsignal(signal.SIGTERM)
    _terminated_mid_write(monkeypatch)
    with pytest.raises(JacpipeError, match=r"terminated \(SIGTERM\); the partial file was "
                                           "removed") as caught:
        export_mod.export(str(out), dest)
    assert caught.value.exit_code == 143
    assert os.listdir(dest.parent) == []  # neither J.npy nor .J.npy.<pid>.tmp.npy
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    result = CliRunner().invoke(app, ["export", str(out), str(dest)])
    assert result.exit_code == 143
    assert "terminated (SIGTERM)" in error_line(result)
    assert os.listdir(dest.parent) == []
