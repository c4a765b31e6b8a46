# jacpipe: `make run` and `make test` are all a new user needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= out/make-run

.PHONY: setup run test test-fast test-opdb lint bench clean cluster-up cluster-down cluster-status

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# A real job: a 2000 x 2000 float32 MLP Jacobian in 8 shards on the embedded
# local Ray, then checked against torch.autograd.functional.jacobian.
run: setup
	$(BIN)/jacpipe run mlp -p n=2000 -p m=2000 --shards 8 --executor ray --out $(OUT) --no-resume --verify

test: setup
	$(BIN)/python -m pytest -q

# The fast subset, in process (no Ray, subprocess, cluster or S3; about a minute and a half).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

# Every sample of every op of PyTorch's operator database (not in `make test`).
test-opdb: setup
	$(BIN)/python -m pytest -q -m opdb_all tests/maths/test_engine_opdb.py tests/sparse/test_detect_opdb.py

lint: setup
	$(BIN)/ruff check pipeline jobs tests benchmarks scripts examples

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf out .pytest_cache

# A two-node Ray cluster on 127.0.0.1 (token auth, dashboard on 127.0.0.1:8265 when
# free) for `jacpipe submit`; state in .cluster/, `cluster-down` stops only it.
cluster-up: setup
	PYTHON=$(BIN)/python scripts/cluster.sh up

cluster-status:
	PYTHON=$(BIN)/python scripts/cluster.sh status

cluster-down:
	PYTHON=$(BIN)/python scripts/cluster.sh down
