"""report.html renders in headless Chromium with every plot and thumbnail, and no console
error; it is self-contained (nothing fetched from anywhere). The notebook runs against the
same finished run."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_embed_stage import job_yaml

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def render_in_chromium(path: str) -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("headless Chromium is needed: `make test` installs Debian's chromium package")
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=5000", "--dump-dom", f"file://{path}"],
                         capture_output=True, text=True, timeout=120)
    return out.stdout, out.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    base = tmp_path_factory.mktemp("report")
    write_corpus(io.join(str(base), "corpus", "records.json"), io.join(str(base), "corpus"), 40, seed=11)
    out = io.join(str(base), "run")
    assert main(["run", "--input", io.join(str(base), "corpus", "records.json"),
                 "--image-root", io.join(str(base), "corpus"), "--model", tiny_model, "--output", out,
                 "--layers", "1,3,4", "--clusters", "4", "--iterations", "5", "--label-field", "concept,skill",
                 "--config", job_yaml(base, "job", 8, 4)]) == 0
    return out


@pytest.mark.slow
def test_report_renders_every_plot_and_thumbnail(finished_run):
    report = io.join(finished_run, schema.REPORT_PATH)
    assert io.join(finished_run, io.read_json(io.join(finished_run, schema.MANIFEST_PATH))["paths"]["report"]) == report
    page = open(report, encoding="utf-8").read()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained
    dom, log = render_in_chromium(report)
    check = re.search(r'data-check="plots=(\d+) empty=(\d+) broken_images=(\d+)"', dom)
    assert check, "the page's own check did not run"
    plots, empty, broken = map(int, check.groups())
    assert plots == 5 and empty == 0 and broken == 0  # four of the run, one of the labels
    assert dom.count('class="thumb"') >= 3  # the gallery shows images
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log


@pytest.mark.slow
def test_the_notebook_runs_against_a_finished_run(finished_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("COINCIDE_RUN", finished_run)
    notebook = nbformat.read(ROOT / "notebooks" / "explore_run.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "counts:" in text and "selected per cluster" in text and "rank   0" in text
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
