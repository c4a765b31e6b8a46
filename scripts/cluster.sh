#!/usr/bin/env bash
# Start, stop or check a two-node Ray cluster on 127.0.0.1 (token auth, dashboard on
# 127.0.0.1), for trying `jacpipe submit` on one machine:
#   scripts/cluster.sh up [--num-cpus 1] [--dashboard-port 8265] [--port 6379]
#   scripts/cluster.sh status
#   scripts/cluster.sh down
# State (process groups, ports, token file) lives in .cluster/; `down` kills only the
# processes `up` started. Never `ray stop`: it kills every Ray on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m scripts.localcluster "$@" --state-dir "${CLUSTER_STATE:-.cluster}"
