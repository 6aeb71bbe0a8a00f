"""``python -m benchmarks``: what each mode runs, and a real smoke run of the harness
(tiny cases: it checks the plumbing, JSON and Markdown, not the figures)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.__main__ import main, plan
from benchmarks._report import render_block, write_block


def _args(mode: str) -> dict[str, list[str]]:
    return {step.name: step.argv for step in plan(mode)}


def test_gpu_mode_runs_every_benchmark_on_cuda_with_the_issues_cases():
    # Execute
    steps = _args("gpu")
    # Assert
    assert list(steps) == ["attention", "federation", "communication", "models"]
    assert all(argv[argv.index("--device") + 1] == "cuda" for argv in steps.values())
    sizes = steps["attention"][steps["attention"].index("--sizes") + 1:steps["attention"].index("--batch")]
    assert {"28", "56"} <= set(sizes) and steps["attention"][steps["attention"].index("--batch") + 1] == "16"
    assert {"nano", "tiny", "small", "base", "large", "--knobs"} <= set(steps["models"])
    federation = steps["federation"]
    assert federation[federation.index("--model") + 1] == "medvit_v2_tiny"
    assert federation[federation.index("--img-size") + 1] == "64" and federation[federation.index("--sites") + 1] == "4"
    assert federation[federation.index("--paths") + 1:federation.index("--model")] == ["plain", "inprocess"]


def test_quick_mode_measures_the_default_federation_on_cpu():
    steps = _args("quick")
    # Repeated: on a shared machine one sequence of the paths measures the drift of its load.
    assert steps["federation"] == ["--preset", "default", "--repeats", "2"]
    assert "cuda" not in sum(steps.values(), [])


def test_gpu_mode_refuses_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --gpu would run for minutes")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--gpu", "--results-dir", str(tmp_path)])


def test_smoke_run_writes_results_machine_and_replaces_only_its_docs_block(tmp_path):
    # Prepare: a docs file with hand-written text around an old smoke block.
    docs = tmp_path / "performance.md"
    docs.write_text("# Performance\n\nhand-written\n\n<!-- BEGIN smoke -->\nold\n<!-- END smoke -->\n\ntail\n")
    # Execute
    code = main(["--smoke", "--results-dir", str(tmp_path / "results"), "--docs", str(docs)])
    # Assert
    assert code == 0
    record = json.loads((tmp_path / "results" / "run_smoke.json").read_text())
    assert {"cpu_model", "cpu_cores", "gpu", "torch", "flwr", "natten"} <= set(record["machine"])
    assert all(status["ok"] for status in record["benchmarks"].values())
    for status in record["benchmarks"].values():
        assert json.loads((tmp_path / "results" / status["json"]).read_text())
    text = docs.read_text()
    assert text.startswith("# Performance\n\nhand-written\n\n<!-- BEGIN smoke -->\n### `python -m benchmarks --smoke`")
    assert text.endswith("<!-- END smoke -->\n\ntail\n") and "old" not in text
    assert text.count("<!-- BEGIN smoke -->") == 1 and "| nano | 28 | 2 | infer |" in text


def test_federation_table_shows_ratios_and_targets(tmp_path):
    # Prepare: a hand-made federation result.
    def path(total, ratio, **extra):
        return {"total_s": total, "startup_s": 1.0, "round_s": [2.0, 1.5], "steady_round_s": 1.5, "teardown_s": 0.5,
                "fixed_s": 2.0, "ratio_total": ratio, "cpu_s": None, "ratio_cpu": None, "load_avg_1m": [1.0, 2.0],
                **extra}

    data = {"settings": {"sites": 3, "rounds": 2, "epochs": 2, "model": "medvit_v2_nano", "dataset": "breastmnist",
                         "img_size": 28, "batch_size": 32, "device": "cpu", "cpus_per_site": 1.0},
            "preset": "default", "data": "embedded", "identical_final_weights": True,
            "results": {"plain": path(10.0, 1.0, plain_total_s=10.0),
                        # each row beside the plain loop of its own repeat
                        "inprocess": path(10.5, 1.05, plain_total_s=10.0, target_ratio_total=1.1, meets_target=True),
                        "ray": path(14.0, 1.4, target_ratio_total=1.3, meets_target=False)}}
    (tmp_path / "federation_cpu.json").write_text(json.dumps(data))
    record = {"command": "python -m benchmarks --quick", "wall_time_s": 1.0,
              "machine": {"cpu_model": "x", "cpu_cores": 2, "gpu": None, "torch": "t", "cuda": None, "flwr": "f",
                          "natten": "n", "natten_cuda_kernels": False, "ray": "r", "load_avg_1m": 1.0, "date": "d"},
              "benchmarks": {"federation": {"ok": True, "json": "federation_cpu.json", "wall_time_s": 1.0}}}
    # Execute
    block = render_block("quick", record, tmp_path)
    write_block(tmp_path / "p.md", "quick", record, tmp_path)
    # Assert
    assert "(the default `medfed simulate`)" in block
    assert "| inprocess | 10.5 | 10.0 | 1.0 | 2.00 | 1.50 | 0.5 | 2.0 | 1.05 | - | - | 1.0 / 2.0 | <= 1.1x: met |" in block
    assert "| ray | 14.0 | - | 1.0 | 2.00 | 1.50 | 0.5 | 2.0 | 1.40 | - | - | 1.0 / 2.0 | <= 1.3x: missed |" in block
    assert (tmp_path / "p.md").read_text() == f"<!-- BEGIN quick -->\n{block}<!-- END quick -->\n"


def test_only_reruns_the_named_benchmark_and_keeps_the_others_results(tmp_path):
    # Prepare: a full smoke run.
    results, docs = tmp_path / "results", tmp_path / "p.md"
    main(["--smoke", "--results-dir", str(results), "--docs", str(docs)])
    first = json.loads((results / "run_smoke.json").read_text())
    # Execute
    main(["--smoke", "--only", "communication", "--results-dir", str(results), "--docs", str(docs)])
    # Assert
    again = json.loads((results / "run_smoke.json").read_text())
    assert list(again["benchmarks"]) == list(first["benchmarks"])
    assert again["benchmarks"]["attention"]["from_earlier_run"] is True
    assert "from_earlier_run" not in again["benchmarks"]["communication"]
    assert "#### attention" in docs.read_text() and "from an earlier run" in docs.read_text()


def test_results_written_elsewhere_leave_the_repositorys_docs_alone(monkeypatch, tmp_path):
    # A measurement into a scratch folder once rewrote docs/performance.md's quick block
    # with a partial table that cited JSON the repository does not hold.
    import benchmarks.__main__ as harness

    calls = []
    monkeypatch.setattr(harness, "run", lambda mode, results_dir, docs, only=None: calls.append(docs) or
                        {"benchmarks": {}, "wall_time_s": 0.0})
    main(["--quick", "--only", "models", "--results-dir", str(tmp_path)])
    main(["--quick", "--only", "models"])
    main(["--quick", "--results-dir", str(tmp_path), "--docs", str(tmp_path / "p.md")])
    assert calls == [None, harness.DOCS, tmp_path / "p.md"]
