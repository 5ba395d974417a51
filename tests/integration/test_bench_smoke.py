import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_runs_in_quick_mode():
    # From the repository root, as `make bench` runs it: every script's every figure, no failure.
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "bench.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    out = run.stdout
    assert run.returncode == 0 and " failed" not in out, out[-2000:] + run.stderr[-2000:]
    figures = [line for line in out.splitlines() if " baseline " in line and " ratio " in line]
    for prefix in ("mmd_full_ranking", "mmd_first", "mmd_top", "kmeans_ray_", "embed_pipeline_", "stage_", "rd_driver",
                   "rd_worker", "rd_read", "rd_kmeans", "driver_bytes_per_iteration_4_nodes", "demo_"):
        assert any(line.startswith(prefix) for line in figures), prefix
    assert all("(quick)" in line for line in figures)
    objective = next(line for line in figures if line.startswith("kmeans_ray_objective"))
    assert float(objective.split("ratio")[1].split()[0]) >= 0.9  # the same algorithm as faiss's


def test_ray_job_entrypoint_starts():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "select_job.py"), "--help"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "--input" in out and "--fraction" in out
