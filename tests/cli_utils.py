"""Run a jaxsft command as a user does: `python -m MODULE ARGS...` in a subprocess, from the
repository root, offline, with tracebacks off (JAXSFT_DEBUG=0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Set by conftest.py for the session: the directory of a persistent JAX compilation cache that
# the jaxsft subprocesses of the tests share ("" or unset: no cache).
CACHE_ENV = "JAXSFT_TEST_COMPILATION_CACHE"


def compilation_cache_env() -> dict[str, str]:
    """Environment for a subprocess that reuses the XLA executables earlier subprocesses of
    this session compiled for the same program (the cache key is the whole HLO module, the
    compile options and devices, and jax/jaxlib's versions: the executable is the one a fresh
    compile makes, results are bit-identical). Every program is cached, however small.

    Only subprocesses get it: the pytest process compiles as it always did, so tests that
    count compiles in process (test_sample's CompileCounter) still see every compile."""
    path = os.environ.get(CACHE_ENV, "")
    if not path:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": path,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def run_module(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **compilation_cache_env(),
        "HF_HUB_OFFLINE": "1",
        "JAXSFT_DEBUG": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def fake_devices_env(devices: int) -> dict[str, str]:
    """os.environ for a subprocess that sees `devices` fake CPU devices (XLA_FLAGS must be set
    before jax is imported, hence a subprocess)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    return env


def result_of(stdout: str) -> dict:
    """The JSON a check script printed on its last line starting with 'RESULT '."""
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def run_script(script: str, *args: str, devices: int = 8, timeout: int = 600) -> dict:
    """Run `python -c script args...` on `devices` fake CPU devices; its RESULT JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=fake_devices_env(devices),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return result_of(proc.stdout)
