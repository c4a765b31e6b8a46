"""``pipeline.core.options``: sizes, choices and RunOptions' checks."""

from __future__ import annotations

import pytest

from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions, parse_size


@pytest.mark.parametrize("text,value", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20),
                                        ("1.5G", 1_500_000_000), ("1000", 1000), ("64kb", 64_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "3 parsecs"])
def test_parse_size_rejects(text):
    with pytest.raises(JacpipeError):
        parse_size(text)


def test_run_options_check_refuses_bad_values_before_anything_starts():
    for opts, match in [
        (RunOptions(job="j", method="bogus"), "--method must be auto, rev or fwd"),
        (RunOptions(job="j", device="tpu"), "--device must be auto, cpu or cuda"),
        (RunOptions(job="j", dtype="float16"), "--dtype must be float32 or float64"),
        (RunOptions(job="j", chunk_size=0), "--chunk-size must be at least 1"),
        (RunOptions(job="j", memory_budget="lots"), "memory size 'lots'"),
    ]:
        with pytest.raises(JacpipeError, match=match):
            opts.check()


@pytest.mark.parametrize("field,value,match", [
    ("cpus_per_shard", 0,
     r"--cpus-per-shard must be a positive number of CPUs \(e.g. 1 or 0.5\), got 0"),
    ("cpus_per_shard", float("nan"), r"--cpus-per-shard must be a positive number .*got nan"),
    ("cpus_per_shard", -2, r"--cpus-per-shard must be a positive number .*got -2"),
    ("cpus_per_shard", float("inf"), r"--cpus-per-shard must be a positive number .*got inf"),
    ("gpus_per_shard", -1, r"--gpus-per-shard must be 0 or a positive number of GPUs .*got -1"),
    ("gpus_per_shard", float("nan"), r"--gpus-per-shard must be 0 or a positive number .*got nan"),
])
def test_resource_shares_are_refused_for_their_own_reason(field, value, match):
    with pytest.raises(JacpipeError, match=match) as caught:
        RunOptions(job="j", **{field: value}).check()
    assert "cluster" not in str(caught.value)


def test_valid_resource_shares_pass_the_check():
    RunOptions(job="j", cpus_per_shard=0.5, gpus_per_shard=0).check()
    RunOptions(job="j", cpus_per_shard=2, gpus_per_shard=0.25).check()


def test_help_choices_are_the_library_ones():
    from pipeline.core import options as plan
    from pipeline.core.options import CHOICES

    assert CHOICES["device"] == plan.DEVICES
    assert CHOICES["dtype"] == plan.DTYPES
    assert CHOICES["method"] == plan.METHODS
    assert CHOICES["executor"] == plan.EXECUTORS


@pytest.mark.parametrize("cli,python", [
    ("--out /tmp/o: the job changed; --overwrite to start again",
     "out=/tmp/o: the job changed; overwrite=True to start again"),
    ("--device must be auto or cpu, got 'tpu'", "device must be auto or cpu, got 'tpu'"),
    ("rerun with --compression zstd to resume", "rerun with compression=zstd to resume"),
    ("it takes no --address (use --executor ray or auto)",
     "it takes no address (use executor=ray or auto)"),
    ("--no-resume and --resume", "resume=False and resume=True"),
    ("--chunk-size must be at least 1", "chunk_size must be at least 1"),
    ("stopped: rerun the same command to resume", "stopped: call again with the same arguments "
     "to resume"),
    ("see `jacpipe run --help`; keep --out-of-band as is", "see `jacpipe run --help`; keep "
     "--out-of-band as is"),
])
def test_python_spelling_names_the_python_arguments(cli, python):
    from pipeline.core.options import python_spelling

    assert python_spelling(cli) == python
