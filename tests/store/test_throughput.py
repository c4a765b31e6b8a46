"""``pipeline.store.throughput``: measured rates and the codec ``--compression auto`` takes."""

from __future__ import annotations

import pytest

from pipeline.core.codec import CODECS, DEFAULT_COMPRESSION
from pipeline.store.parts import dense_schema, sparse_schema
from pipeline.store.storage import Storage
from pipeline.store.throughput import (
    AutoChoice,
    EncodeRate,
    auto_codec,
    choose_codec,
    committed_rate,
    disk_rate,
    encode_rates,
    sample_table,
)

MB = 1e6
#: Rates like those measured on random-looking float32 (issue 27): the faster
#: the codec encodes, the less it shrinks.
RATES = {
    "zstd": EncodeRate(300 * MB, 0.84),
    "lz4": EncodeRate(400 * MB, 0.92),
    "snappy": EncodeRate(380 * MB, 0.92),
    "none": EncodeRate(700 * MB, 1.0),
}


#: Rates like those measured on banded rows (mostly zeros): every codec but
#: ``none`` shrinks them 100-1000x, and zstd encodes them fastest.
BANDED = {
    "zstd": EncodeRate(500 * MB, 0.003),
    "lz4": EncodeRate(330 * MB, 0.007),
    "snappy": EncodeRate(380 * MB, 0.05),
    "none": EncodeRate(430 * MB, 1.0),
}


@pytest.mark.parametrize(("disk", "expected"), [
    (2000 * MB, "none"),  # a fast disk: the encoder is the bottleneck, encode least
    (200 * MB, "none"),   # none commits 156 MB/s, lz4 141, zstd 133
    (100 * MB, "zstd"),   # none 88, zstd 85 (a tie): the fewest bytes win
    (50 * MB, "zstd"),    # a disk slower than zstd's encode: zstd 50, lz4 48, none 47
    (None, DEFAULT_COMPRESSION),  # not measured (an object store): the default
])
def test_auto_picks_the_codec_that_commits_fastest(disk, expected):
    assert choose_codec(RATES, disk) == expected


def test_a_fast_codec_that_shrinks_wins_over_none_on_a_slow_disk():
    rates = {"none": EncodeRate(700 * MB, 1.0), "lz4": EncodeRate(690 * MB, 0.6),
             "zstd": EncodeRate(200 * MB, 0.5)}
    assert choose_codec(rates, 300 * MB) == "lz4"  # none 210 MB/s, lz4 290, zstd 150


@pytest.mark.parametrize(("disk", "expected"), [
    (2000 * MB, "none"),  # worst cases: none 0.71 (banded), lz4 0.65, snappy 0.62, zstd 0.51
    (200 * MB, "zstd"),   # none 0.28 (banded), zstd 0.85 (random), lz4 0.66 (banded)
    (50 * MB, "zstd"),    # a slow disk: zstd is fastest on both samples
])
def test_auto_takes_the_codec_whose_worse_sample_is_best(disk, expected):
    samples = {"random-looking": RATES, "banded": BANDED}
    assert choose_codec(samples, disk) == expected
    assert choose_codec({"random-looking": RATES}, disk) == choose_codec(RATES, disk)


def test_the_banded_sample_keeps_auto_from_writing_zeros_uncompressed():
    """Rates as PartWriter committed them on 2 busy cores (benchmarks/codecs.py, MB/s)."""
    random = {"none": EncodeRate(80 * MB, 1.0), "snappy": EncodeRate(61 * MB, 0.914),
              "lz4": EncodeRate(58 * MB, 0.92), "zstd": EncodeRate(56 * MB, 0.84)}
    banded = {"none": EncodeRate(81 * MB, 1.0), "snappy": EncodeRate(115 * MB, 0.05),
              "lz4": EncodeRate(122 * MB, 0.007), "zstd": EncodeRate(106 * MB, 0.003)}
    assert choose_codec(random, 400 * MB) == "none"
    # none: 0.66 of lz4 on banded rows; lz4 0.73 of none on random ones, snappy 0.76 (a tie)
    assert choose_codec({"random-looking": random, "banded": banded}, 400 * MB) == "lz4"


def test_committed_rate_is_the_cpus_then_the_disk():
    zstd = RATES["zstd"]
    # the encoders, then the fsync of 0.84 bytes a raw byte
    assert committed_rate(zstd, 1000 * MB) == pytest.approx(1 / (1 / (300 * MB) + 0.84 / 1e9))
    assert committed_rate(zstd, float("inf")) == pytest.approx(300 * MB)
    # the hash on its own thread, slower than the encoders
    assert committed_rate(zstd, float("inf"), hash_rate=200 * MB, threads=10**6) == (
        pytest.approx(200 * MB / 0.84))


def test_the_hash_shares_the_encoders_cores():
    none = EncodeRate(242 * MB, 1.0)
    shared = committed_rate(none, float("inf"), hash_rate=432 * MB, threads=2)
    assert shared == pytest.approx(1 / (1 / (242 * MB) + 1 / (864 * MB)))
    assert committed_rate(none, float("inf"), hash_rate=432 * MB, threads=1000) == (
        pytest.approx(242 * MB, rel=0.01))


def test_the_probe_rates_measured_here_choose_a_fast_codec_not_none():
    """The probe's rates in benchmarks/results/codecs.json (2 busy cores, MB/s)."""
    random = {"zstd": EncodeRate(115 * MB, 0.846), "lz4": EncodeRate(148.6 * MB, 0.924),
              "snappy": EncodeRate(143.6 * MB, 0.918), "none": EncodeRate(256 * MB, 1.0)}
    banded = {"zstd": EncodeRate(212 * MB, 0.0018), "lz4": EncodeRate(249 * MB, 0.006),
              "snappy": EncodeRate(336 * MB, 0.0486), "none": EncodeRate(242 * MB, 1.0)}
    both = {"random-looking": random, "banded": banded}
    assert choose_codec(random, 466 * MB, hash_rate=432 * MB, threads=2) == "none"
    assert choose_codec(both, 466 * MB, hash_rate=432 * MB, threads=2) == "lz4"


def test_near_ties_take_the_smaller_files_and_the_hash_counts():
    rates = {"none": EncodeRate(1000 * MB, 1.0), "zstd": EncodeRate(980 * MB, 0.5)}
    assert choose_codec(rates, 1000 * MB) == "zstd"  # 2 % slower, half the bytes
    assert choose_codec({"none": EncodeRate(1000 * MB, 1.0), "zstd": EncodeRate(800 * MB, 0.9)},
                        5000 * MB) == "none"
    # a slow sha256 on the writer's thread bounds "none" as a slow disk would
    assert choose_codec({"none": EncodeRate(1000 * MB, 1.0), "zstd": EncodeRate(800 * MB, 0.5)},
                        5000 * MB, hash_rate=500 * MB) == "zstd"


@pytest.mark.parametrize("schema", [dense_schema(300, "float32"), sparse_schema("float64"),
                                    dense_schema(40, "float64", index="sample", extra=("stderr",))])
def test_the_encode_probe_samples_have_the_parts_schema(schema):
    for banded in (False, True):
        table = sample_table(schema, nbytes=64 * 1024, banded=banded)
        assert table.schema.equals(schema.remove_metadata())
        assert 32 * 1024 <= table.nbytes <= 2 * 64 * 1024
        assert table.column("values").null_count == 0


def test_the_banded_sample_holds_seven_entries_a_row():
    table = sample_table(dense_schema(50, "float32"), nbytes=(50 * 4 + 8) * 20, banded=True)
    values = table.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 50)
    assert values.shape == (20, 50)
    assert ((values != 0).sum(axis=1) == 7).all()
    assert values[10, 7] != 0 and values[10, 13] != 0 and values[10, 14] == 0


def test_encode_rates_measure_every_codec_on_both_samples():
    samples = encode_rates(dense_schema(1000, "float32"), threads=2, cached=False)
    assert list(samples) == ["random-looking", "banded"]
    rates, banded = samples["random-looking"], samples["banded"]
    assert sorted(rates) == sorted(banded) == sorted(CODECS)
    assert all(r.rate > 0 for r in [*rates.values(), *banded.values()])
    assert rates["none"].ratio == pytest.approx(1.0, abs=0.01)
    # random floats: zstd shrinks the exponent bytes (BYTE_STREAM_SPLIT), not the mantissas
    assert 0.6 < rates["zstd"].ratio < 0.95
    assert banded["zstd"].ratio < 0.05 and banded["none"].ratio == pytest.approx(1.0, abs=0.01)
    # the sparse layout stores nonzeros only: no banded sample
    assert list(encode_rates(sparse_schema("float64"), threads=1, codecs=("none",))) == [
        "random-looking"]


def test_the_disk_probe_writes_in_the_folder_leaves_nothing_and_is_cached(tmp_path):
    storage = Storage(str(tmp_path))
    rate = disk_rate(storage, size=2 * 2**20, cached=False)
    assert rate is not None and rate > 0
    assert list(tmp_path.iterdir()) == []
    cached = disk_rate(storage, size=2 * 2**20)
    assert disk_rate(storage, size=2 * 2**20) == cached  # one probe per device and process


def test_an_object_store_is_not_probed_and_gets_the_default(monkeypatch):
    class Remote:
        local = False

    assert disk_rate(Remote()) is None  # type: ignore[arg-type]
    monkeypatch.setattr("pipeline.store.throughput.disk_rate", lambda storage: None)
    monkeypatch.setattr("pipeline.store.throughput.encode_rates",
                        lambda schema, threads, codecs: {"random-looking": RATES})
    choice = auto_codec(Remote(), dense_schema(4, "float32"), threads=1)  # type: ignore[arg-type]
    assert choice.codec == DEFAULT_COMPRESSION
    assert choice.to_json()["disk_bytes_per_s"] is None


def test_the_choice_is_recorded_with_its_rates():
    choice = AutoChoice(codec="none", disk_bytes_per_s=500 * MB, hash_bytes_per_s=10**15,
                        threads=2, encode={"random-looking": RATES, "banded": BANDED})
    doc = choice.to_json()
    assert doc["codec"] == "none" and doc["disk_bytes_per_s"] == 500 * MB
    zstd = doc["encode"]["random-looking"]["zstd"]
    assert zstd["bytes_per_s"] == 300 * MB and zstd["ratio"] == 0.84
    expected = committed_rate(RATES["zstd"], 500 * MB, hash_rate=10**15, threads=2)
    assert zstd["committed_bytes_per_s"] == pytest.approx(expected, abs=1)
    assert expected == pytest.approx(1 / (1 / (300 * MB) + 0.84 / (500 * MB)))
    line = choice.line()
    assert "auto: none (disk 500 MB/s; encoding random-looking | banded rows on 2" in line
    assert "zstd 300|500 MB/s x0.84|0.003" in line


def test_auto_never_reaches_a_part_writer_unresolved():
    from pipeline.store.parts import writer_options

    with pytest.raises(ValueError, match="auto reached a part writer"):
        writer_options(dense_schema(4, "float32"), "auto")
