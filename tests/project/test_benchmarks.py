"""The benchmark harness runs every system and writes its reports.

Timings are never asserted here (the machines are shared and noisy): only
that the harness measures what it says and writes what it promises.
"""

import json
import math

import numpy as np
import pytest

from benchmarks import report, run
from benchmarks.floor import Floor
from benchmarks.systems import systems
from benchmarks.workloads import Workload, workloads

TINY = [
    Workload("tiny dense", "two small variables", ((64,), (8, 8))),
    Workload("embedding", "a 100 x 4 table, 5 rows touched", ((100, 4),), rows_touched=5),
]
META = {"machine": "test", "repeats": 2, "floor_kind": "test", "quick": True}


def test_every_applicable_system_is_timed_and_reported(tmp_path):
    results = []
    for workload in TINY:
        results += run.time_workload(workload, repeats=2, log=lambda *_: None)
    for workload in TINY:
        expected = {s.name for s in systems() if run.applicable(s, workload)}
        assert {r.system for r in results if r.workload == workload.name} == expected
    assert all(r.median_ms > 0 and len(r.samples_ms) == 2 for r in results)

    table = report.markdown(results, TINY, META)
    assert "## tiny dense" in table and "## embedding" in table and "## Targets" in table
    assert "lazy sparse ≥ 10× the dense update of the table" in table
    assert "(the call alone: " in table  # the stretch rows give the bare call too
    report.write_json(tmp_path / "r.json", results, META)
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == len(results)
    report.plot(tmp_path / "r.png", results, TINY)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    report.write_docs_page(tmp_path / "docs" / "performance.md", table, tmp_path / "r.png")
    page = (tmp_path / "docs" / "performance.md").read_text()
    assert page.startswith("# Performance") and "## tiny dense" in page
    assert (tmp_path / "docs" / "img" / "benchmarks.png").exists()
    # Undated tables (saved before tables carried a date) get the page's warning.
    assert "Undated, test;" in table and "Measured before the exact scalars" in page
    dated = report.markdown(results, TINY, {**META, "date": "2026-12-06"})
    assert "\n2026-12-06, test; 2 interleaved rounds" in dated
    report.write_docs_page(tmp_path / "docs" / "performance.md", dated, tmp_path / "r.png")
    assert "Measured before" not in (tmp_path / "docs" / "performance.md").read_text()


def test_systems_that_do_not_fit_in_memory_together_are_timed_in_groups(monkeypatch):
    # Half of the memory holds two systems of the workload: groups of two, dealt in turn.
    assert run.memory_groups(5, 1000, 4 * run.BYTES_PER_PARAMETER * 1000) == [
        [0, 3],
        [1, 4],
        [2],
    ]
    assert run.memory_groups(5, 1000, 10**12) == [[0, 1, 2, 3, 4]]
    assert run.memory_groups(2, 10**12, 1) == [[0], [1]]  # never an empty group
    workload = TINY[0]
    monkeypatch.setattr(run, "available_memory", lambda: 2 * run.BYTES_PER_PARAMETER * 64 * 2)
    lines = []
    results = run.time_workload(workload, repeats=2, log=lines.append)
    expected = [s.name for s in systems() if run.applicable(s, workload)]
    assert [r.system for r in results] == expected
    assert all(r.median_ms > 0 and len(r.samples_ms) == 2 for r in results)
    assert lines[0] == f"  (in {len(expected)} groups of systems, interleaved within each: memory)"


def test_floor_does_adams_arithmetic():
    """The floor is a real Adam pass (not just copies), in C when it can be."""
    floor = Floor(1000)
    p, g = floor.p.astype(np.float64), floor.g.astype(np.float64)
    floor.step()
    m = 0.1 * g
    v = 0.001 * g * g
    np.testing.assert_allclose(floor.p, p - 1e-3 * m / (np.sqrt(v) + 1e-7), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(floor.m, m, rtol=1e-5, atol=1e-9)
    assert not np.array_equal(floor.p, p)


def test_memory_probe_reports_a_peak():
    index = [w.name for w in workloads(quick=True)].index("1 large")
    peak = run.peak_memory_mb(index, "keras_adam default, tf.function", quick=True)
    # m and v for 2.1M float32 parameters are 16 MB: the peak is at least that
    # (weights and gradients are subtracted).
    assert peak is not None and peak >= 16


def test_fit_mode_trains_each_system_and_reports_the_loss_agreement(tmp_path):
    from benchmarks import end_to_end

    output = tmp_path / "fit.md"
    end_to_end.main(
        ["--quick", "--epochs", "2", "--rounds", "1", "--models", "lstm", "--control"]
        + ["--output", str(output)]
    )
    table = output.read_text()
    for mode in ('jit_compile="auto"', "jit_compile=True (XLA)"):
        assert mode in table
    rows = [line for line in table.splitlines() if line.startswith("| lstm |")]
    systems = ["keras Adam", "keras_adam", "keras Adam again"]
    assert [row.split(" | ")[1] for row in rows] == systems * 2
    # Same weights, same data order, no embedding: the loss curves agree to round-off.
    for row in rows[1::3] + rows[2::3]:
        assert float(row.split(" | ")[6]) < 1e-5
    saved = json.loads(output.with_suffix(".json").read_text())
    assert saved["meta"]["backend"] == "tensorflow"
    assert [(r["mode"], r["system"]) for r in saved["runs"]] == [
        (mode, system) for mode in ("auto", "true") for system in systems
    ]
    # The row's speed-up is its round's ratio (one round: the spread is that ratio too).
    keras_epoch, ours_epoch = (saved["runs"][k]["steady"][0] for k in (0, 1))
    speedup, spread = rows[1].split(" | ")[4:6]
    assert speedup == f"{keras_epoch / ours_epoch:.2f}x"
    assert spread == f"{keras_epoch / ours_epoch:.2f}-{keras_epoch / ours_epoch:.2f}"


def test_fit_speedup_plot_has_a_bar_per_backend_and_model(tmp_path, monkeypatch):
    from benchmarks import end_to_end

    def saved(backend, ratios):
        runs = []
        for model, values in ratios.items():
            runs.append(dict(model=model, mode="auto", system="keras Adam", steady=[1.0] * 3))
            runs.append(
                dict(model=model, mode="auto", system="keras_adam", steady=[1 / v for v in values])
            )
        path = tmp_path / f"fit_{backend}.json"
        path.write_text(json.dumps({"meta": {"backend": backend}, "runs": runs}))
        return path

    paths = [
        saved("tensorflow", {"convnet": [1.2, 1.4, 1.3], "lstm": [1.0, 1.1, 0.9]}),
        saved("torch", {"convnet": [3.0, 2.0, 4.0]}),
    ]
    bars = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        bars.append((kwargs["label"], list(x), list(height), kwargs["yerr"]))
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    end_to_end.plot_speedups(paths, tmp_path / "fit_speedup.png")
    assert (tmp_path / "fit_speedup.png").read_bytes()[:4] == b"\x89PNG"
    (tf_label, tf_x, tf_medians, tf_err), (torch_label, torch_x, torch_medians, torch_err) = bars
    assert (tf_label, torch_label) == ("tensorflow", "torch")
    assert tf_x == [-0.2, 0.8] and torch_x == [0.2]  # convnet, then lstm
    np.testing.assert_allclose(tf_medians, [1.3, 1.0])
    np.testing.assert_allclose(tf_err, [[0.1, 0.1], [0.1, 0.1]], atol=1e-12)
    np.testing.assert_allclose(torch_medians, [3.0])
    np.testing.assert_allclose(torch_err, [[1.0], [1.0]])

    # The Performance page shows the plot above the fit tables, and copies it to docs/img.
    (tmp_path / "fit_tensorflow.md").write_text("# model.fit on the tensorflow backend\n\nrows\n")
    (tmp_path / "r.png").write_bytes(b"png")
    report.write_docs_page(tmp_path / "docs" / "performance.md", "# T\n", tmp_path / "r.png")
    page = (tmp_path / "docs" / "performance.md").read_text()
    figure = page.index("](img/fit-speedup.png)")
    assert page.index("## Training real models") < figure < page.index("### On TensorFlow")
    copied = tmp_path / "docs" / "img" / "fit-speedup.png"
    assert copied.read_bytes() == (tmp_path / "fit_speedup.png").read_bytes()


def test_fit_modes_name_their_compiler_and_add_the_ops_path_under_torch_compile():
    from benchmarks.end_to_end import DEFAULT_MODES, mode_title, systems

    assert mode_title("true", "torch") == "jit_compile=True (torch.compile)"
    assert mode_title("true", "jax") == "jit_compile=True (XLA)"
    assert mode_title("false", "tensorflow") == "jit_compile=False"
    assert list(systems("torch", False, "true")) == [
        "keras Adam", "keras_adam", "keras_adam fused=False"
    ]  # fmt: skip
    assert list(systems("torch", False, "auto")) == ["keras Adam", "keras_adam"]
    # The A/A control: Keras's Adam a second time, as its own system.
    chosen = systems("jax", False, "auto", control=True)
    assert list(chosen) == ["keras Adam", "keras_adam", "keras Adam again"]
    assert chosen["keras Adam again"] is chosen["keras Adam"]
    assert DEFAULT_MODES["torch"] == ("auto", "true")


def test_fit_mode_models_build_and_take_their_data():
    import keras

    from benchmarks.models import cases

    for case in cases(quick=True):
        keras.utils.set_random_seed(0)
        model = case.build()
        x, y = case.data()
        prediction = model.predict(x[:4], verbose=0)
        assert prediction.shape[0] == 4 and len(y) == len(x)
        layers = model._flatten_layers(include_self=False)
        has_embedding = any(isinstance(layer, keras.layers.Embedding) for layer in layers)
        assert has_embedding == case.embeddings


@pytest.mark.slow
def test_tuning_search_benchmark_reports_edges_overhead_and_verdict(tmp_path):
    from benchmarks import tuning_search

    tuning_search.main(
        ["--problems", "wine", "--systems", "ours", "previous", "asha", "--seeds", "1",
         "--trials", "8", "--asha-trials", "9", "--epochs", "3", "--repeats", "2",
         "--output", str(tmp_path)]
    )  # fmt: skip
    rows = json.loads((tmp_path / "tuning_search.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["ours", "previous", "asha"]
    for row in rows:
        assert 0 <= row["edge"] <= 1 and 0 < row["overhead"] < 1
        assert np.isfinite(row["test_loss"])
    assert [len(r["points"]) for r in rows] == [8, 8, 9]
    assert [r["guided"] for r in rows] == [2, 2, 3]
    # Full trials train all their epochs; ASHA (rungs at 1 and 3) most of them 1.
    assert rows[0]["epochs_trained"] == rows[1]["epochs_trained"] == 8 * 3
    assert 9 + 2 * 3 <= rows[2]["epochs_trained"] < 9 * 3
    assert rows[0]["verdict"]["use"] in ("tuned", "default")
    assert rows[1]["verdict"] is None
    assert rows[2]["verdict"]["use"] in ("tuned", "default")


@pytest.mark.slow
def test_tuning_search_peers_record_their_epochs_and_anytime_curves(tmp_path):
    from benchmarks import tuning_search

    plot = tmp_path / "anytime.png"
    tuning_search.main(
        ["--problems", "wine", "--systems", "random2", "optuna_hyperband", "optuna_sh",
         "kt_hyperband", "--seeds", "1", "--trials", "3", "--asha-trials", "9", "--epochs", "3",
         "--repeats", "1", "--output", str(tmp_path), "--plot", str(plot)]
    )  # fmt: skip
    rows = {
        r["system"]: r for r in json.loads((tmp_path / "tuning_search.json").read_text())["rows"]
    }
    assert len(rows["random2"]["points"]) == 6 and rows["random2"]["epochs_trained"] == 18
    for system in ("optuna_hyperband", "optuna_sh"):
        assert len(rows[system]["points"]) == 9
        assert rows[system]["epochs_trained"] <= 9 * 3
    # KerasTuner's Hyperband with max_epochs=3, factor 3: brackets of 1 and 3 epochs.
    assert rows["kt_hyperband"]["epochs_trained"] < len(rows["kt_hyperband"]["points"]) * 3
    for row in rows.values():
        assert np.isfinite(row["test_loss"])
        times, best, test = zip(*row["anytime"], strict=True)
        assert list(times) == sorted(times) and 0 < times[-1] <= row["wall"]
        assert list(best) == sorted(best, reverse=True)  # the best so far never worsens
        # The held-out loss is the best trial's: it changes only with the best.
        assert all(np.isfinite(test)) and min(test) > 0
        for i in range(1, len(best)):
            assert best[i] < best[i - 1] or test[i] == test[i - 1]
    assert plot.stat().st_size > 10_000


def test_tuning_search_reach_is_the_time_to_ours_final_held_out_loss():
    from benchmarks.tuning_search import held_out_at, reach, summary

    ours = {"problem": "wine", "system": "ours", "seed": 0, "wall": 10.0, "test_loss": 0.5,
            "default_test_loss": 0.6, "verdict": None, "edge": 0, "overhead": 0.1,
            "anytime": [[2.0, 0.9, 0.8], [6.0, 0.7, 0.4], [9.0, 0.6, 0.45]]}  # fmt: skip
    fast = dict(ours, system="asha", anytime=[[1.0, 0.8, 0.5], [3.0, 0.6, 0.44]])
    never = dict(ours, system="optuna", anytime=[[1.0, 0.8, 0.46]])
    # Ours ends holding a trial whose test loss is 0.45 (not its best-ever 0.4).
    assert reach(ours, ours) == 0.6
    assert reach(fast, ours) == 0.3 and reach(never, ours) == float("inf")
    assert held_out_at(fast, 10.0) == 0.44 and math.isnan(held_out_at(ours, 1.0))
    table = summary([ours, fast, dict(fast, seed=1), dict(ours, seed=1)])
    # Reached in 0.3 of ours' time on both seeds; at ours' end, 0.01 better.
    assert "0.30 2/2 -0.0100 ± 0.0000" in table.splitlines()[2]


def test_tuning_search_equal_epochs_compares_what_each_held_after_as_many_epochs():
    from benchmarks.tuning_search import held_out_after, summary

    base = {"problem": "wine", "wall": 10.0, "test_loss": 0.5, "default_test_loss": 0.6,
            "verdict": None, "edge": 0, "overhead": 0.1}  # fmt: skip
    # Full trials: 4 trials of 5 epochs, a point as each ends.
    curve = [[2.0, 0.9, 0.8], [4.0, 0.7, 0.4], [6.0, 0.7, 0.4], [8.0, 0.6, 0.45]]
    ours = dict(
        base, system="ours", seed=0, epochs_trained=20, points=[[1e-3, 0.9]] * 4, anytime=curve
    )
    # Multi-fidelity: 6 configurations, 12 epochs in all, two of them trained to the end.
    asha = dict(base, system="asha", seed=0, epochs_trained=12, points=[[1e-3, 0.9]] * 6,
                anytime=[[3.0, 0.8, 0.5], [5.0, 0.6, 0.42]])  # fmt: skip
    assert held_out_after(ours, 12) == 0.4  # two trials (10 epochs) done
    assert held_out_after(ours, 20) == held_out_after(ours, 99) == 0.45
    assert math.isnan(held_out_after(ours, 4))  # no trial done yet
    # A multi-fidelity search is known only at its end, after all its epochs.
    assert held_out_after(asha, 12) == 0.42 and math.isnan(held_out_after(asha, 11))
    # A full-trial search with a trial that added no point (diverged): unknown.
    assert math.isnan(held_out_after(dict(ours, anytime=ours["anytime"][1:]), 20))
    table = summary([ours, asha, dict(asha, seed=1), dict(ours, seed=1)]).splitlines()
    # At ours' end (10 s) ASHA held 0.42 against 0.45; after 12 epochs each, 0.42 against 0.4.
    assert table[2].endswith("-0.0300 ± 0.0000 +0.0200 ± 0.0000")
    # Where ASHA trained more epochs than ours, its state at ours' 20 is not known.
    rows = [dict(row, seed=seed) for seed in range(3) for row in (ours, asha)]
    rows[5]["epochs_trained"] = 30
    assert summary(rows).splitlines()[2].endswith("+0.0200 ± 0.0000 (2/3)")


def test_tuning_search_merge_keeps_the_rows_a_run_does_not_redo():
    from benchmarks.tuning_search import merged

    def row(system, seed, loss):
        return {"problem": "wine", "system": system, "seed": seed, "test_loss": loss}

    old = {
        "args": {"seeds": 2},
        "rows": [row("ours", 0, 1.0), row("ours", 1, 2.0), row("optuna", 0, 3.0)],
        "ours_expected_improvement": [row("ours_ei", 0, 4.0)],
    }
    new = {"args": {"first_seed": 1}, "rows": [row("ours", 1, 5.0), row("ours", 2, 6.0)]}
    out = merged(old, new)
    assert [(r["system"], r["seed"], r["test_loss"]) for r in out["rows"]] == [
        ("ours", 0, 1.0), ("optuna", 0, 3.0), ("ours", 1, 5.0), ("ours", 2, 6.0)
    ]  # fmt: skip
    assert out["runs"] == [old["args"], new["args"]] and out["args"] == new["args"]
    assert out["ours_expected_improvement"] == old["ours_expected_improvement"]


def test_fit_control_is_passed_to_each_backend_and_refused_without_fit(
    tmp_path, monkeypatch, capsys
):
    import subprocess

    from benchmarks import __main__ as command

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, env, check: calls.append((argv, env)))
    command.main(["--fit", "--control", "--backend", "jax", "--output", str(tmp_path)])
    (argv, env), *others = calls
    assert not others and env["KERAS_BACKEND"] == "jax"
    assert argv[argv.index("-m") + 1] == "benchmarks.end_to_end" and "--control" in argv
    with pytest.raises(SystemExit):
        command.main(["--control"])
    assert "--control goes with --fit" in capsys.readouterr().err
