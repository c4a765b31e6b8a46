#!/usr/bin/env bash
# GPU benchmark, ready to run on NVIDIA GPUs (under 5 minutes on one H100/H200; no network):
#   bash benchmarks/gpu.sh [--n 8192 --m 8192 --hidden 2048 --shards 4 --gpus 1]
# Prints one JSON object to stdout; writes benchmarks/results/gpu.json. Its "disk" row is
# issue 27's target: committed bytes/s of values over the same disk's sequential write rate,
# measured in the run in the scratch folder (--dir; target >= 0.8; --compression auto default).
# Uses the machine's python3 with torch; installs carried wheels from .whl/
# if there are any (e.g. pyarrow or typer for another Python), never the network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps .whl/*.whl
fi
"$PY" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "pyarrow", "numpy", "psutil", "typer", "rich", "scipy")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages {missing}: carry their wheels in .whl/")
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(), file=sys.stderr)
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m benchmarks.gpu "$@"
