"""``pipeline.runner.cluster``: stale cluster variables."""

from __future__ import annotations

import pytest


def test_stale_cluster_variables_are_one_line(tmp_path):
    from pipeline.core.errors import JacpipeError
    from pipeline.runner.cluster import refuse_stale_cluster_env

    refuse_stale_cluster_env({})
    refuse_stale_cluster_env({"RAY_ADDRESS": "local"})
    with pytest.raises(JacpipeError, match="RAY_ADDRESS=127.0.0.1:9 is set but no Ray") as exc:
        refuse_stale_cluster_env({"RAY_ADDRESS": "127.0.0.1:9"})
    assert "unset RAY_ADDRESS" in str(exc.value) and "\n" not in str(exc.value)
    gone = str(tmp_path / ".cluster" / "auth_token")
    with pytest.raises(JacpipeError, match="RAY_AUTH_MODE=token is set but the token file"):
        refuse_stale_cluster_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": gone})
    (tmp_path / "token").write_text("t0k3n\n")
    refuse_stale_cluster_env({"RAY_AUTH_MODE": "token",
                              "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    refuse_stale_cluster_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"})
