"""`python -m benchmarks.memory` measures every part and writes what it promises.

Tiny settings (`--tiny`): the numbers mean nothing, only that each table has
its rows and that they are finite.
"""

import json
import math

import pytest

from benchmarks import memory


@pytest.mark.slow
def test_memory_benchmark_reports_every_part(tmp_path):
    table = memory.main(["--backend", "tensorflow", "--tiny", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "memory_tensorflow.json").read_text())
    ours = [memory.ours(d) for d in memory.our_dtypes()]
    for heading in ("Optimizer state", "Training quality", "Moment error", "Optimizer step time"):
        assert f"## {heading}" in table

    assert [r["label"] for r in data["state"]] == [memory.KERAS, *ours]
    for row in data["state"]:
        assert "error" not in row, row
        assert row["parameters"] > 0 and math.isfinite(row["peak_mb"]) and row["peak_mb"] > 0
    per_param = {r["label"]: r["state_bytes"] / r["parameters"] for r in data["state"]}
    assert per_param[memory.KERAS] == pytest.approx(8, rel=0.01)
    assert per_param[memory.FLOAT32] == pytest.approx(8, rel=0.01)
    for dtype, at_most in (("int8", 2.2), ("int4", 1.2)):
        if memory.ours(dtype) in per_param:
            assert per_param[memory.ours(dtype)] < at_most

    cases = {c.name for c in memory.quality_cases()}
    config = memory.settings(tiny=True)
    for model in cases:
        for label in ours:
            runs = [r for r in data["quality"] if r["model"] == model and r["optimizer"] == label]
            assert len(runs) == config.seeds
            for run in runs:
                assert len(run["val_loss"]) == config.epochs
                assert all(math.isfinite(v) for v in run["val_loss"] + run["loss"])
            assert f"| {model} | {label} | " in table
    # Embedding tables keep float32 moments by default; the tables' variants quantize them.
    for dtype in memory.quantized_available():
        for model in ("transformer", "recommender"):
            mine = [r for r in data["quality"] if r["model"] == model]
            default = {r["quantized_share"] for r in mine if r["optimizer"] == memory.ours(dtype)}
            tables = {
                r["quantized_share"]
                for r in mine
                if r["optimizer"] == memory.ours(dtype, tables=True)
            }
            assert len(tables) == 1 and max(tables) > max(default), (model, default, tables)
        recommender = {
            r["quantized_share"]
            for r in data["quality"]
            if r["model"] == "recommender" and r["optimizer"] == memory.ours(dtype)
        }
        assert recommender == {0.0}  # nothing but embedding tables

    assert [r["optimizer"] for r in data["error"]] == ours
    for row in data["error"]:
        assert all(math.isfinite(v) for k, v in row.items() if k != "optimizer")
    assert data["error"][0]["m_rel_rms"] < 1e-5  # float32 moments: round-off only

    timed = {(r["workload"], r["system"]) for r in data["speed"] if "median_ms" in r}
    for workload in memory.speed_workloads(config):
        for label in [memory.KERAS, *ours]:
            assert (workload.name, f"{label}, tf.function") in timed
    assert all(r["median_ms"] > 0 for r in data["speed"])

    assert (tmp_path / "memory_tensorflow_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "## Optimizer state and peak memory (tensorflow)"
        in (tmp_path / "memory_state.md").read_text()
    )


def test_a_peers_quantized_share_counts_only_low_bit_state():
    import torch

    class OptimState8bit(torch.Tensor):  # how torchao's state looks: a tensor subclass
        pass

    params = [torch.zeros(300), torch.zeros(100), torch.zeros(600)]
    quantized = torch.zeros(300).as_subclass(OptimState8bit)

    class Optimizer:
        state = {
            params[0]: {"exp_avg": quantized, "step": torch.tensor(1.0)},
            params[1]: {"exp_avg": torch.zeros(100), "exp_avg_sq": torch.zeros(100)},
            params[2]: {"state1": torch.zeros(600, dtype=torch.uint8)},  # bitsandbytes'
        }

    assert memory.peer_quantized_share(Optimizer(), params) == 0.9
