"""Shared fixtures: tiny HF checkpoints built once per session, and a record of the measured
parity errors that is printed at the end of the run and written as JSON.

Set JAXSFT_PARITY_JSON=/some/file.json to keep the parity record outside pytest's tmp dir.

The jaxsft subprocesses the tests start (train_utils, cli_utils) share a persistent JAX
compilation cache made for the session and removed at its end: most of them compile the same
tiny train, eval and decoding programs, which now compile once per session. Set
JAXSFT_TEST_COMPILATION_CACHE=DIR to use (and keep) DIR instead, or to "" to compile afresh in
every subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest

# Measured errors, filled by test_model_parity / test_model_sharding:
# {"family/dtype/case": {"max_abs_err": ..., "logit_scale": ..., "rel_err": ..., "tol": ...}}
PARITY_RECORD: dict[str, dict] = {}
_TIMINGS: dict[str, float] = {}
_BASETEMP: list = []


_CACHE_ENV = "JAXSFT_TEST_COMPILATION_CACHE"  # read by cli_utils.compilation_cache_env
_OWN_CACHE: list[str] = []


def pytest_configure(config):
    if _CACHE_ENV not in os.environ:
        _OWN_CACHE.append(tempfile.mkdtemp(prefix="jaxsft-test-compilation-cache-"))
        os.environ[_CACHE_ENV] = _OWN_CACHE[0]


def pytest_unconfigure(config):
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(_CACHE_ENV, None)
    _OWN_CACHE.clear()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> str:
    """The README demo's assets (tiny Llama, tokenizer, chat data), made once per session and
    shared read-only by the training, fault and malformed-input tests."""
    from jaxsft.demo import ensure_assets

    return ensure_assets(str(tmp_path_factory.mktemp("demo_assets")))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict:
    """{family name: checkpoint dir} for every entry of hf_fixtures.FAMILIES."""
    from hf_fixtures import build_all

    root = tmp_path_factory.mktemp("hf_checkpoints")
    _BASETEMP.append(tmp_path_factory.getbasetemp())
    t0 = time.perf_counter()
    paths = build_all(root)
    _TIMINGS[f"hf fixture build ({len(paths)} checkpoints)"] = time.perf_counter() - t0
    return paths


@pytest.fixture(scope="session")
def parity_record(tmp_path_factory) -> dict:
    _BASETEMP.append(tmp_path_factory.getbasetemp())
    return PARITY_RECORD


def pytest_terminal_summary(terminalreporter):
    if not PARITY_RECORD and not _TIMINGS:
        return
    tr = terminalreporter
    tr.section("jaxsft model parity (max |jax - transformers| / max |logit|)")
    for name, seconds in _TIMINGS.items():
        tr.write_line(f"{name}: {seconds:.1f} s")
    for key in sorted(PARITY_RECORD):
        r = PARITY_RECORD[key]
        line = (
            f"{key:45s} max_abs_err={r['max_abs_err']:.3e} logit_scale={r['logit_scale']:.3f} "
            f"rel={r['rel_err']:.3e} tol={r['tol']:.1e}"
        )
        if "hf_bf16_rel_err" in r:
            line += f" (transformers bf16: {r['hf_bf16_rel_err']:.3e})"
        tr.write_line(line)
    payload = {"timings_s": _TIMINGS, "parity": PARITY_RECORD}
    targets = []
    if _BASETEMP:
        targets.append(os.path.join(str(_BASETEMP[0]), "model_parity_errors.json"))
    if os.environ.get("JAXSFT_PARITY_JSON"):
        targets.append(os.environ["JAXSFT_PARITY_JSON"])
    for target in targets:
        with open(target, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
        tr.write_line(f"written: {target}")
