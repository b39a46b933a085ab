"""The memory planner (`python -m jaxsft.plan`) on a model directory that holds only
config.json: its parameter, optimizer and gradient bytes equal what a real run holds per
device (8 fake CPU devices, in a subprocess with the real train state built from a weights
file), `--fit` proposes only configurations whose compiled step fits the limit (checked by
compiling the proposal again from its printed overrides), the JSON layout, and bad input
exits 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_utils import REPO, fake_devices_env, result_of, run_module

# A tiny Llama as transformers' LlamaConfig(...).to_dict() writes it (5.x style).
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
    "transformers_version": "5.24.0",
}
# Elements of the tiny Llama: embedding + lm_head, per layer q,k,v,o, gate/up/down, 2 norms.
TINY_PARAMS = 2 * 256 * 32 + 32 + 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32)

# The real train state (setup.build_model_state, weights read from a safetensors file) on 8 fake
# devices, next to the planner's report for the same config; bytes held by device 0.
EXACT_SCRIPT = r"""
import contextlib, io, json, shutil, sys
import jax, numpy as np
from safetensors.numpy import save_file
from jaxsft import config as config_lib, plan
from jaxsft.hf_io import hf_keys, model_shapes, weight_table
from jaxsft.models.config import ModelConfig
from jaxsft.train import setup as setup_lib

assert jax.device_count() == 8, jax.devices()
model_dir, weights_dir, run_py = sys.argv[1:4]
cases = json.loads(sys.argv[4])
cfg = ModelConfig.from_hf(model_dir)
shapes = model_shapes(model_dir)
tensors = {}
for e in weight_table(cfg):
    shape = shapes[".".join(e.path)].shape[len(e.stack):]
    for k in hf_keys(e):
        tensors[k] = np.zeros(shape[::-1] if e.transpose else shape, np.float32)
shutil.copy(model_dir + "/config.json", weights_dir)
save_file(tensors, weights_dir + "/model.safetensors")
dev = jax.devices()[0]

def on_dev0(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)

out = {}
for name, overrides in cases.items():
    config = config_lib.load(run_py, [*overrides, "--config.model.path=" + weights_dir])
    s = setup_lib.build_model_state(config)
    real = {
        "params": on_dev0(s.state["params"]) + on_dev0(s.frozen) + on_dev0(s.ref),
        "optimizer": on_dev0(s.state["opt_state"]) + on_dev0((s.state["step"], s.state["rng"])),
        "gradients": on_dev0(s.state["params"]),
        "unsharded_params": sum(x.nbytes for x in jax.tree.leaves((s.state["params"], s.frozen))),
    }
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        argv = ["--config", run_py, *overrides, "--devices", "8", "--json", "--no-compile"]
        code = plan.main(argv)
    out[name] = {"real": real, "plan": json.loads(buf.getvalue()), "code": code}
print("RESULT " + json.dumps(out))
"""
CASES = {
    "full_fsdp4_tensor2": ["--config.mesh.fsdp=4", "--config.mesh.tensor=2"],
    "full_kl_data2_fsdp4": [
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        "--config.train.kl_to_base=0.1",
    ],
    "lora_bf16_fsdp8": [
        "--config.lora.rank=4",
        "--config.model.param_dtype=bfloat16",
        "--config.lora.targets=('q_proj','v_proj','down_proj')",
    ],
}


def write_run_config(path: Path, model_dir: Path, **extra) -> Path:
    lines = [
        "from jaxsft.configs import base",
        "def get_config():",
        "    c = base.get_config()",
        f"    c.model.path = {str(model_dir)!r}",
        "    c.data.train = 'never_read.jsonl'",
        "    c.data.max_length = 64",
        "    c.train.batch_size = 8",
        "    c.train.loss_chunk = 128",
        *(f"    c.{k.replace('__', '.')} = {v!r}" for k, v in extra.items()),
        "    return c",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama_config_only")
    (d / "config.json").write_text(json.dumps(TINY_LLAMA, indent=2))
    return d


@pytest.fixture(scope="module")
def run_py(tmp_path_factory, model_dir) -> Path:
    return write_run_config(tmp_path_factory.mktemp("plan_cfg") / "run.py", model_dir)


def plan_json(*argv) -> tuple[int, dict]:
    """jaxsft.plan.main in this process (one CPU device), its JSON report."""
    from jaxsft import plan

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = plan.main([*argv, "--json"])
    return code, json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def base_report(run_py):
    return plan_json("--config", str(run_py), "--device-memory", "1GiB")


def _popen(argv, env) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory, model_dir, run_py):
    """The two 8-device subprocesses, started when the module starts so that they run beside
    the in-process compiles: the real state next to the planner's formulas (8 fake devices
    from XLA_FLAGS), and the CLI with --devices 8 from a 1-device process (it re-executes)."""
    weights = tmp_path_factory.mktemp("tiny_llama_weights")
    env = dict(fake_devices_env(8), JAXSFT_DEBUG="1")
    args = [str(model_dir), str(weights), str(run_py), json.dumps(CASES)]
    exact = _popen([sys.executable, "-c", EXACT_SCRIPT, *args], env)
    cli_env = {**os.environ, "JAXSFT_DEBUG": "0"}
    cli_env.pop("XLA_FLAGS", None)
    argv = ["--config", str(run_py), *CASES["full_fsdp4_tensor2"], "--devices", "8", "--json"]
    cli = _popen([sys.executable, "-m", "jaxsft.plan", *argv], cli_env)
    procs = {"exact": exact, "cli": cli}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def exact_results(background):
    code, out, err = _finish(background["exact"])
    assert code == 0, err[-5000:]
    return result_of(out)


def test_json_layout(base_report):
    code, report = base_report
    assert code == 0
    assert set(report["per_device"]) == {"params", "optimizer", "gradients", "temporaries", "total"}
    assert all(isinstance(v, int) and v > 0 for v in report["per_device"].values())
    per = report["per_device"]
    assert per["total"] == per["params"] + per["optimizer"] + per["gradients"] + per["temporaries"]
    assert report["devices"] == 1 and report["fits"] is True and report["overrides"] == []
    assert report["device_memory"] == 2**30
    assert report["micro_batch"] == {"rows": 8, "tokens": 512, "grad_accum": 1, "remat": "none"}
    # fp32 master weights, AdamW's two fp32 moments (+ counts, step, rng), fp32 gradients
    assert per["params"] == per["gradients"] == 4 * TINY_PARAMS
    assert 2 * per["params"] < per["optimizer"] < 2 * per["params"] + 64


def test_config_json_only_model_dir(model_dir, base_report):
    assert sorted(os.listdir(model_dir)) == ["config.json"]  # no weights, no tokenizer
    _, report = base_report
    assert report["model"] == {
        "model_type": "llama",
        "parameters": TINY_PARAMS,
        "trainable": TINY_PARAMS,
    }


def test_fit_proposal_compiles_within_the_limit(run_py, base_report):
    """A limit just under the configured step (grad_accum 1, remat none) forces the search on;
    the proposal, rebuilt from its printed overrides and compiled again, fits."""
    from jaxsft import config as config_lib
    from jaxsft import plan_memory
    from jaxsft.train.setup import config_mesh

    limit = base_report[1]["per_device"]["total"] - 1
    code, report = plan_json("--config", str(run_py), "--device-memory", str(limit), "--fit")
    assert code == 0 and report["fits"] is True, report
    assert report["per_device"]["total"] <= limit
    tried = report["candidates"]
    assert {"grad_accum": 1, "remat": "none"} not in [
        {k: c[k] for k in ("grad_accum", "remat")} for c in tried if c["fits"]
    ]
    assert all(c["total"] > limit for c in tried if not c["fits"])
    assert all(o.startswith("--config.") for o in report["overrides"])
    config = config_lib.load(str(run_py), report["overrides"])
    assert (config.train.grad_accum, config.model.remat) == (
        report["micro_batch"]["grad_accum"],
        report["micro_batch"]["remat"],
    )
    setup = plan_memory.abstract_setup(config, config_mesh(config))
    stats = plan_memory.memory_stats(plan_memory.compile_train_step(setup, config))
    compiled_total = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
    assert compiled_total == report["per_device"]["total"] <= limit


def test_fit_reports_when_nothing_fits(run_py, base_report):
    """Below the parameters + optimizer + gradients alone nothing is compiled: exit 1."""
    per = base_report[1]["per_device"]
    limit = per["params"] + per["optimizer"] + per["gradients"] - 1
    code, report = plan_json("--config", str(run_py), "--device-memory", str(limit), "--fit")
    assert code == 1 and report["fits"] is False and report["overrides"] == []
    assert report["candidates"] == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config.model.path={empty}"], "no config.json"),
        (["--config.mesh.data=3", "--devices", "8"], "does not match 8 devices"),
        (["--device-memory", "lots"], "cannot parse --device-memory 'lots'"),
        (["--device-memory", "0GB"], "cannot parse --device-memory"),
        (["--fit"], "--fit needs --device-memory"),
        (["--config.train.grad_accum=3"], "multiple of train.grad_accum"),
    ],
)
def test_bad_input_exits_2(tmp_path, run_py, capsys, argv, message):
    from jaxsft import plan

    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    with pytest.raises(SystemExit) as e:
        plan.main(["--config", str(run_py), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_exit_code_2_without_traceback(tmp_path, model_dir):
    run = write_run_config(tmp_path / "run.py", tmp_path)  # tmp_path has no config.json
    proc = run_module("jaxsft.plan", "--config", str(run), "--devices", "8")
    assert proc.returncode == 2, proc.stderr
    assert "no config.json" in proc.stderr and "Traceback" not in proc.stderr


# The 8-device subprocesses, started by `background`, last: they ran beside the tests above.
@pytest.mark.parametrize("case", list(CASES))
def test_bytes_equal_the_real_sharded_state_on_8_devices(exact_results, case):
    r = exact_results[case]
    real, got = r["real"], r["plan"]["per_device"]
    assert r["code"] == 0 and r["plan"]["devices"] == 8
    for key in ("params", "optimizer", "gradients"):
        assert got[key] == real[key], (case, key, got[key], real[key])
    assert got["temporaries"] is None and got["total"] is None  # --no-compile
    assert got["params"] < real["unsharded_params"]  # really split, not replicated
    if case.startswith("lora"):  # adapters only: gradients and moments are tiny
        assert got["gradients"] * 4 < got["params"]


def test_devices_flag_reexecutes_on_8_fake_devices_and_compiles(background, exact_results):
    code, out, err = _finish(background["cli"])
    assert code == 0, err[-3000:]
    assert "8 fake CPU devices" in err
    report = json.loads(out)
    assert report["devices"] == 8 and report["mesh"] == {
        "data": 1,
        "expert": 1,
        "fsdp": 4,
        "tensor": 2,
    }
    per = report["per_device"]
    real = exact_results["full_fsdp4_tensor2"]["real"]
    assert [per[k] for k in ("params", "optimizer", "gradients")] == [
        real[k] for k in ("params", "optimizer", "gradients")
    ]
    assert per["temporaries"] > 0
    assert per["total"] == sum(per[k] for k in ("params", "optimizer", "gradients", "temporaries"))
    c = report["compiled"]  # the compiled arguments are the state and the batch, nothing else
    batch = 4 * (8 // 4) * 64 * 4  # 4 int32 [B, T] arrays, rows split over data x fsdp = 4
    assert c["argument"] == per["params"] + per["optimizer"] + batch
