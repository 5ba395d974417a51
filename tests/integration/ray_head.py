"""A real Ray head started with `ray start --head` on loopback, in a temporary folder of its
own, and stopped by the ids of exactly the processes it started, never by Ray's own stop
command, which ends every Ray on the machine.

Ray finds "the cluster started last" through an address file in its temporary folder,
whose default follows TMPDIR; the head and every process a test points at it share one
private TMPDIR, so nothing else on the machine sees this head, and it sees nothing else.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayHead:
    """`env` is what every process meant for this head runs with: the private TMPDIR, and
    token authentication with a token of its own (Ray 2.60 turns authentication on for
    local clusters; the head and the `ray job` CLI must use the same token)."""

    def __init__(self, *extra: str):
        self.folder = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: socket paths have a length limit
        # as after `. .venv/bin/activate` (the README's rehearsal): a job's `python` is the venv's
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # metrics every 2 s rather than Ray's 10 s: a job's driver reports its k-means gauge at
        # the next report after it is set, and a short job can end before a 10 s one comes
        self.env = {**os.environ, "PATH": path, "TMPDIR": str(self.folder), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_metrics_report_interval_ms": "2000"}
        self.env.pop("RAY_ADDRESS", None)
        self.extra = extra
        self.address = ""
        self.dashboard_port, self.metrics_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> RayHead:
        out = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--port=0",
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                              f"--metrics-export-port={self.metrics_port}", "--num-cpus=2",
                              f"--dashboard-agent-listen-port={free_port()}",
                              "--disable-usage-stats", *self.extra], env=self.env, capture_output=True, text=True,
                             timeout=180)
        if out.returncode:
            self.stop()
            raise RuntimeError(f"ray start failed: {out.stderr[-2000:]}")
        self.address = next(line.split("'")[1] for line in out.stdout.splitlines() if "ray start --address=" in line)
        return self

    def processes(self) -> list[psutil.Process]:
        """Every process started for this head: Ray renames its processes (ray::DashboardAgent),
        so the command line may no longer name the temporary folder, but the environment
        they inherited still holds this head's TMPDIR."""
        mine = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                named = any(str(self.folder) in part for part in (process.info["cmdline"] or []))
                if named or process.environ().get("TMPDIR") == str(self.folder):
                    mine.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return mine

    def stop(self) -> None:
        for _ in range(3):
            mine = self.processes()
            if not mine:
                break
            for process in mine:
                try:
                    process.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(mine, timeout=10)
            for process in alive:
                process.kill()
            time.sleep(0.5)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()
