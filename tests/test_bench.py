"""Smoke test of the main job, ``python -m deep_ep.bench``, on CPU at tiny sizes.

It runs the real command line (2 gloo processes, every workload) and checks that the table is
printed with every check ok, that the exit status is 0, and that ``--json`` writes a valid file.
The argument parser is also checked in-process, since a wrong size must fail before anything
is spawned.
"""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--num-processes", "2", "--num-tokens", "48", "--hidden", "256", "--num-topk", "3",
        "--num-experts", "8", "--ll-num-tokens", "16", "--iters", "2", "--warmup", "1", "--timeout", "120"]


def _run(module: str, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_cpu_tiny_prints_table_and_json(tmp_path):
    from deep_ep.bench import ALL_WORKLOADS

    json_path = tmp_path / "bench.json"
    proc = _run("deep_ep.bench", *TINY, "--seed", "1234", "--json", str(json_path))
    log = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    lines = proc.stdout.splitlines()
    assert any(line.startswith("deep_ep bench: seed 1234") for line in lines), log
    header = next((i for i, line in enumerate(lines) if line.startswith("workload")), None)
    assert header is not None, log
    for column in ("backend", "ranks", "time (us)", "GB/s", "baseline (us)", "baseline GB/s", "speed-up", "check"):
        assert column in lines[header], log
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 2 + len(ALL_WORKLOADS)]}
    assert sorted(rows) == sorted(ALL_WORKLOADS), log
    for name, cells in rows.items():
        assert cells[-1] == "ok", log
        assert cells[1] == "torch" and cells[2] == "2", log
    assert "FAIL" not in proc.stdout, log
    assert f"{len(ALL_WORKLOADS)}/{len(ALL_WORKLOADS)} checks passed" in proc.stdout, log
    assert "[bench] ht-dispatch-bf16 1/6" in proc.stderr, log  # the progress line

    document = json.loads(json_path.read_text())
    assert document["options"]["seed"] == 1234
    assert document["options"]["num_processes"] == 2
    results = document["results"]
    assert [r["workload"] for r in results] == list(ALL_WORKLOADS)
    for result in results:
        assert result["check_ok"] is True, result
        assert result["ranks"] == 2
        assert result["time_us"] > 0 and result["baseline_time_us"] > 0
        assert result["gbps"] > 0 and result["baseline_gbps"] > 0 and result["speedup"] > 0
        assert result["bytes_per_rank"] > 0
        assert len(result["rank_median_us"]) == 2


def test_package_main_runs_the_bench():
    proc = _run("deep_ep", "--help", timeout=120.0)
    assert proc.returncode == 0, proc.stderr
    assert "--workloads" in proc.stdout and "--json" in proc.stdout


@pytest.mark.parametrize("argv, expected", [
    (["--workloads", "ll"], ["ll-dispatch-fp8", "ll-combine-bf16", "ll-dispatch-combine"]),
    (["--workloads", "ht-combine-bf16,ll-dispatch-fp8,ht-combine-bf16"], ["ht-combine-bf16", "ll-dispatch-fp8"]),
])
def test_workload_selection(argv, expected):
    from deep_ep.bench import parse_args

    options, json_path = parse_args(["--device", "cpu", *argv])
    assert options.workloads == expected and json_path is None
    assert options.num_processes == 4 and options.hidden % 128 == 0


@pytest.mark.parametrize("argv", [
    ["--hidden", "100"],
    ["--num-experts", "30"],  # not a multiple of the 4 default ranks
    ["--workloads", "nope"],
    ["--num-topk", "0"],
    ["--num-sms", "3"],
])
def test_bad_arguments_exit_before_spawning(argv):
    from deep_ep.bench import parse_args

    with pytest.raises(SystemExit) as raised:
        parse_args(["--device", "cpu", *argv])
    assert raised.value.code == 2
