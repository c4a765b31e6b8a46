"""``pipeline.core.shard``: shard specs and results round-trip through JSON."""

from __future__ import annotations

import json


def test_shard_spec_and_result_round_trip_through_json():
    from pipeline.core.shapes import Shapes
    from pipeline.core.shard import ShardResult, ShardSpec

    spec = ShardSpec(job="mlp", params={"n": 4}, fingerprint={"x": "y"},
                     shapes=Shapes("batched", (3,), (2,), 5, "float64"), index=1, start=2,
                     stop=8, out="/o", method="rev", layout="dense", memory_budget=2**20,
                     threads=1, device="cpu", device_param=True, run_id="r", group_rows=4)
    assert ShardSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.part_meta()["shard"] == {"index": 1, "start": 2, "stop": 8}
    result = ShardResult(index=1, start=2, stop=8, file="part-00001.parquet", rows=6,
                         checksum="0" * 64, gpu_ids=["0"], attempt=2)
    assert ShardResult.from_json(json.loads(json.dumps(result.to_json()))) == result
