"""The torch-backend benchmark (`python -m benchmarks.torch_backend`) runs and reports.

Timings are never asserted: only that every system is measured and the
table and targets are written.
"""

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
