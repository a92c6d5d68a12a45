"""Smoke test: every benchmark script in bench/ runs its --quick mode (tiny models) and prints its results.

Scripts are discovered by glob, so a new bench_*.py is covered the day it lands. They run in parallel subprocesses with
one OpenMP thread each (tiny models; on a busy 2-core machine two threads per process only wait on each other); most of
their time is importing torch and diffusers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bench").glob("bench_*.py"))
TIMEOUT_S = 150  # per script, generous: the whole set normally finishes in well under a minute
PARALLEL = 4


def _start(script: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(script), "--quick"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def quick_runs() -> dict[str, tuple[int, str, str, float]]:
    results: dict[str, tuple[int, str, str, float]] = {}
    pending = list(SCRIPTS)
    running: dict[Path, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            script = pending.pop(0)
            running[script] = (_start(script), time.monotonic())
        for script, (proc, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started < TIMEOUT_S:
                continue
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            code = proc.returncode if proc.returncode is not None else -9
            results[script.name] = (code, out, err, time.monotonic() - started)
            del running[script]
        time.sleep(0.2)
    return results


def test_every_bench_script_is_found():
    names = {s.name for s in SCRIPTS}
    assert {"bench_transformer_step.py", "bench_load.py", "bench_memory.py", "bench_step_cache.py"} <= names


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS])
def test_quick_mode_runs(quick_runs, script):
    code, out, err, seconds = quick_runs[script]
    assert code == 0, f"{script} --quick failed (exit {code}, {seconds:.0f} s):\n{err[-2000:]}"
    assert out.strip(), f"{script} --quick printed nothing"
