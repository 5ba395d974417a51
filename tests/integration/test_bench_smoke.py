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
                   "rd_worker", "rd_read", "rd_kmeans", "driver_bytes_per_iteration_4_nodes", "demo_", "padding_token_budget", "prepare_images_per_s_40ms",
                   "scale_3k_list_embed_driver_peak", "scale_6k_jsonl10_record_path", "scale_unchanged_rerun_embed"):
        assert any(line.startswith(prefix) for line in figures), prefix
    assert all("(quick)" in line for line in figures)
    objective = next(line for line in figures if line.startswith("kmeans_ray_objective"))
    assert float(objective.split("ratio")[1].split()[0]) >= 0.9  # the same algorithm as faiss's


def test_gpu_check_runs_its_path_on_the_cpu():
    # The GPU check at toy size with device cpu: the same code a CUDA machine runs, every figure finite.
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "gpu_check.py"), "--device", "cpu", "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = {line.split()[0]: float(line.split()[1]) for line in run.stdout.splitlines() if " baseline " in line}
    for name in ("gpu_check_embed_bare_samples_per_s", "gpu_check_embed_pipeline_samples_per_s",
                 "gpu_check_vectors_min_cosine_vs_cpu_fp32", "gpu_check_selection_overlap_vs_cpu_fp32",
                 "gpu_check_kmeans_s_per_iteration", "gpu_check_projected_hours_llava_665k"):
        assert name in figures and figures[name] == figures[name] and figures[name] > 0, name  # present, not NaN
    assert figures["gpu_check_vectors_min_cosine_vs_cpu_fp32"] > 0.99  # float32 both sides, float16 storage


def test_ray_job_entrypoint_starts():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "select_job.py"), "--help"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "--input" in out and "--fraction" in out
