"""Helpers for the training tests: the demo assets (tiny Llama, tokenizer, chat data) made once
per session, and running `python -m jaxsft.main` in a subprocess with N fake CPU devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from cli_utils import compilation_cache_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.py")

# Small, fast runs: short rows, 8 rows a step, log every step, no multiple-choice eval (the
# demo's eval.mc: a test that wants it sets it again).
FAST = [
    "--config.data.max_length=48",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.save_every=0",
    "--config.train.eval_at_start=false",
    "--config.export.format=none",
    "--config.eval.mc=",
]


def subprocess_env(assets: str, devices: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update(compilation_cache_env())
    env.update(
        JAXSFT_DEMO_ASSETS=assets,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def main_argv(run_dir: str, overrides=()) -> list[str]:
    """The command line of `python -m jaxsft.main` on the demo config with the FAST overrides."""
    return [
        sys.executable,
        "-m",
        "jaxsft.main",
        "--config",
        DEMO_CONFIG,
        f"--config.run_dir={run_dir}",
        *FAST,
        *overrides,
    ]


def run_main(
    assets: str, run_dir: str, overrides=(), devices: int = 1, check=True, env=None, timeout=600
):
    proc = subprocess.run(
        main_argv(run_dir, overrides),
        env=env or subprocess_env(assets, devices),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"jaxsft.main failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start_two_processes(assets: str, run_dir: str, overrides=()) -> list[subprocess.Popen]:
    """`python -m jaxsft.main` as two processes x 2 fake devices (jax.distributed over gloo on
    a free local port), started without waiting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            main_argv(run_dir, overrides),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(
                assets,
                2,
                JAXSFT_COORDINATOR=f"127.0.0.1:{port}",
                JAXSFT_NUM_PROCESSES=2,
                JAXSFT_PROCESS_ID=i,
            ),
        )
        for i in range(2)
    ]


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
