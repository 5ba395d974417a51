"""report.html renders in headless Chromium with every plot and thumbnail, and no console
error; it is self-contained (nothing fetched from anywhere)."""

import re
import shutil
import subprocess

import pytest
from test_embed_stage import job_yaml

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.corpus import write_corpus


def render_in_chromium(path: str) -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("headless Chromium is needed: `make test` installs Debian's chromium package")
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=5000", "--dump-dom", f"file://{path}"],
                         capture_output=True, text=True, timeout=120)
    return out.stdout, out.stderr


@pytest.mark.slow
def test_report_renders_every_plot_and_thumbnail(tmp_path, tiny_model):
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 40, seed=11)
    out = io.join(base, "run")
    assert main(["run", "--input", io.join(base, "corpus", "records.json"), "--image-root", io.join(base, "corpus"),
                 "--model", tiny_model, "--output", out, "--layers", "1,3,4", "--clusters", "4",
                 "--iterations", "5", "--config", job_yaml(tmp_path, "job", 8, 4)]) == 0
    report = io.join(out, schema.REPORT_PATH)
    assert io.read_json(io.join(out, schema.MANIFEST_PATH))["paths"]["report"] == report
    page = open(report, encoding="utf-8").read()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained
    dom, log = render_in_chromium(report)
    check = re.search(r'data-check="plots=(\d+) empty=(\d+) broken_images=(\d+)"', dom)
    assert check, "the page's own check did not run"
    plots, empty, broken = map(int, check.groups())
    assert plots == 4 and empty == 0 and broken == 0
    assert dom.count('class="thumb"') >= 3  # the gallery shows images
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log
