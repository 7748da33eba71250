"""The torch-backend benchmark (`python -m benchmarks.torch_backend`) runs and reports.

Timings are never asserted: only that every system is measured and the
table and targets are written.
"""

import os
from pathlib import Path

from benchmarks import run, torch_backend
from benchmarks.workloads import Workload

TINY = [
    Workload("1 large", "one small stand-in", ((4096,),)),
    Workload("200 small", "a few small variables", ((64,), (8, 8), (3,))),
]


def test_every_system_is_timed_and_the_targets_reported():
    candidates = torch_backend.torch_backend_systems()
    results = []
    for workload in TINY:
        results += run.time_workload(workload, 2, log=lambda *_: None, candidates=candidates)
    assert {(r.workload, r.system) for r in results} == {
        (w.name, s.name) for w in TINY for s in candidates
    }
    assert all(r.median_ms > 0 and len(r.samples_ms) == 2 for r in results)
    table = torch_backend.markdown(results, TINY, {"machine": "test", "repeats": 2})
    for system in candidates:
        assert f"| {system.name} | 1 large |" in table
    assert table.count("faster than Keras's torch Adam") == 2
    assert table.count("torch.optim.Adam(fused=True)'s time") == 2


def test_each_compiled_fit_of_the_fit_benchmark_starts_from_an_empty_inductor_cache(
    monkeypatch, tmp_path
):
    # Else the first fit of a model compiles the kernels that the later fits load.
    from benchmarks import end_to_end

    seen = []

    def fit(*args):
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        seen.append((folder, sorted(os.listdir(folder))))
        (Path(folder) / "compiled.so").write_text("")  # what a compile leaves
        return [1.0, 1.0], [0.5, 0.4]

    monkeypatch.setattr(end_to_end, "_fit", fit)
    users = str(tmp_path / "the users cache")
    os.mkdir(users)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", users)
    for mode in ("true", "true", "auto"):
        assert end_to_end.train(None, None, mode, 2, None) == ([1.0, 1.0], [0.5, 0.4])
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == users
    (first, first_files), (second, second_files), (eager, _) = seen
    assert first != second and first_files == second_files == []
    assert eager == users  # eager fits compile nothing: the user's cache is left as it is
    assert not os.path.exists(first)  # removed after its fit
