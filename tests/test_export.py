"""Export to Hugging Face: merged checkpoints reload in transformers and PEFT adapters in peft,
with the logits of the jaxsft model they came from.

Per family, the tiny checkpoint of hf_fixtures (plus a tokenizer with a chat template) is loaded
by jaxsft, "trained" by perturbing its weights (noise on every base parameter for full
fine-tuning; random non-zero lora_b, so B A != 0, for LoRA runs), exported, and reloaded:
  merged  -> AutoModelForCausalLM.from_pretrained: no missing / unexpected / mismatched key,
             no loading warning, logits within FP32_TOL of jaxsft's (float32 compute);
  adapter -> PeftModel.from_pretrained(base, dir): no missing-adapter-key warning, same logits.
Errors are max |jaxsft - transformers| / max |jaxsft logit| and land in conftest's record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cli_utils import run_module  # noqa: E402
from flax import nnx  # noqa: E402
from hf_fixtures import VOCAB, build_checkpoint  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers_fixture import tokenizer_dir  # noqa: E402

import jaxsft  # noqa: E402
from jaxsft import export  # noqa: E402
from jaxsft.errors import UserError  # noqa: E402
from jaxsft.export import merged  # noqa: E402
from jaxsft.export.check import TOLERANCES, ExportCheckError, float32_logits  # noqa: E402
from jaxsft.models.lora import LoraConfig, LoRAParam  # noqa: E402

# The export itself is exact in float32 (only summation order differs: W x + s (x A) B against
# (W + s A B) x); measured below 2e-6 here, 1e-4 is the parity tests' tolerance.
FP32_TOL = 1e-4
# The key and warning texts transformers / peft use for weights they could not place.
BAD_LOAD = re.compile(r"missing|unexpected|newly initiali[sz]ed|not used|mismatch", re.I)
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    tokenizer: str  # kind of tokenizers_fixture
    lora: LoraConfig | None = None
    max_shard_bytes: int = 5 * 1024**3
    peft_modules: tuple[str, ...] | None = None  # PEFT's target_modules, if not lora.targets


CASES = {
    # untied lm_head, full fine-tuning, exported in ~60 KB shards with an index
    "llama": Case("llama3", max_shard_bytes=60_000),
    # tied embeddings, LoRA on all seven projections with rsLoRA scaling
    "llama_tied": Case("llama3", LoraConfig(rank=4, alpha=8.0, rslora=True)),
    # q/k/v bias (kept as base weights), LoRA on some projections only
    "qwen2": Case(
        "chatml",
        LoraConfig(rank=4, alpha=16.0, targets=("q_proj", "v_proj", "o_proj", "down_proj")),
    ),
    # q/k RMSNorm and head_dim != hidden / heads, full fine-tuning
    "qwen3": Case("qwen3", None),
    # offset norms, post-norms, softcaps (in the training steps too), LoRA on all projections
    "gemma2": Case("chatml", LoraConfig(rank=4, alpha=8.0)),
    # q/k offset norms, per-layer RoPE, full fine-tuning
    "gemma3": Case("chatml", None),
    # the language model of Gemma3ForConditionalGeneration (keys under language_model.), LoRA
    # on every projection: the SigLIP tower's q/k/v_proj of the same names get none, and its
    # tensors are carried into the merged export byte for byte
    "gemma3_mm": Case("chatml", LoraConfig(rank=4, alpha=8.0)),
    # LoRA on the fused HF names (separate q/k/v, gate/up adapters, exported to PEFT as one
    # block-structured adapter per fused module); partial rotary, tied embeddings
    "phi4mini": Case(
        "chatml",
        LoraConfig(rank=4, alpha=8.0, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    ),
    # MoE, full fine-tuning: the stacked [L, E, ...] experts written back per expert
    # (block_sparse_moe.experts.{j}.w1/w2/w3)
    "mixtral": Case("chatml", None),
    # MoE with LoRA on attention, on the shared expert's gate_proj/down_proj (PEFT
    # target_modules) and on every routed expert's (PEFT target_parameters on the fused
    # experts: tests/test_moe_lora.py); the router stays frozen
    "qwen2_moe": Case(
        "chatml",
        LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "gate_proj", "down_proj")),
    ),
    # rsLoRA and only some parts of the fused modules: zero blocks for k, v and gate
    "phi3": Case(
        "chatml",
        LoraConfig(rank=2, alpha=4.0, rslora=True, targets=("q_proj", "up_proj", "o_proj")),
        max_shard_bytes=60_000,
        peft_modules=("qkv_proj", "gate_up_proj", "o_proj"),
    ),
}
MESSAGES = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]


def perturb(model: nnx.Module, seed: int, lora: bool, steps: int = 3) -> None:
    """Train a few real steps (jaxsft's train step, Adam at lr 1e-2 so that every weight, or
    every adapter, moves) on a random batch, in place."""
    import optax

    from jaxsft.train.step import make_loss_fn, make_train_step

    graphdef, params, frozen = nnx.split(model, LoRAParam if lora else nnx.Param, ...)
    V = model.cfg.vocab_size
    rs = np.random.RandomState(seed)
    batch = {
        "input_ids": rs.randint(0, V, (2, 16)).astype(np.int32),
        "loss_mask": np.ones((2, 16), np.int32),
        "segment_ids": np.ones((2, 16), np.int32),
        "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
    }
    tx = optax.adam(1e-2)
    step = jax.jit(
        make_train_step(
            make_loss_fn(graphdef, chunk=16, lora=lora), tx, lambda s: 1e-2, grad_accum=1
        )
    )
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jnp.zeros((2,), jnp.uint32),
    }
    for _ in range(steps):
        state, _ = step(state, frozen, None, batch)
    nnx.update(model, state["params"])


def make_source(ckpt: Path, tokenizer_kind: str, root: Path) -> Path:
    """A copy of a tiny checkpoint with a tokenizer (and chat template) beside the weights."""
    src = root / f"src_{ckpt.name}"
    shutil.copytree(ckpt, src)
    for f in Path(tokenizer_dir(tokenizer_kind, root / "tok")).iterdir():
        shutil.copy2(f, src / f.name)
    return src


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_quietly(fn):
    """fn() with transformers/peft warnings and log records collected; (result, messages)."""
    handler = LogCapture()
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return result, handler.messages + [str(w.message) for w in caught]


def hf_causal_lm(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", local_files_only=True, **kw
    )


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def rel_err(got, want) -> tuple[float, float, float]:
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    return err, scale, err / scale


def record(parity_record, key, got, want, tol):
    err, scale, rel = rel_err(got, want)
    parity_record[key] = {"max_abs_err": err, "logit_scale": scale, "rel_err": rel, "tol": tol}
    return rel


def safetensors_keys(path: Path) -> dict[str, list[str]]:
    """{key: [files holding it]} over every .safetensors file of a directory."""
    keys: dict[str, list[str]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "np") as sf:
            for k in sf.keys():
                keys.setdefault(k, []).append(f.name)
    return keys


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, hf_checkpoints, tmp_path_factory):
    """Load, perturb and export one family (merged, and the adapter for LoRA cases)."""
    family, case = request.param, CASES[request.param]
    root = tmp_path_factory.mktemp(f"export_{family}")
    ckpt = hf_checkpoints.get(family) or build_checkpoint(family, root / family)
    source = make_source(ckpt, case.tokenizer, root)
    model, cfg = jaxsft.load_hf(source, dtype="float32", lora=case.lora)
    perturb(model, seed=len(family), lora=case.lora is not None)
    ids = np.random.RandomState(7).randint(3, VOCAB, (2, 20)).astype(np.int32)
    logits = float32_logits(model, ids)
    merged = export.export_merged(
        model, cfg, root / "out" / "hf", tokenizer_dir=source, max_shard_bytes=case.max_shard_bytes
    )
    adapter = None
    if case.lora is not None:
        adapter = export.export_peft(
            model, cfg, case.lora, root / "out" / "adapter", base_model_path=source
        )
    return SimpleNamespace(
        family=family,
        case=case,
        source=source,
        merged=merged,
        adapter=adapter,
        ids=ids,
        logits=logits,
        cfg=cfg,
    )


def test_merged_reloads_in_transformers(exported, parity_record):
    (model, info), msgs = load_quietly(
        lambda: hf_causal_lm(exported.merged, output_loading_info=True)
    )
    assert all(not v for v in info.values()), info  # missing/unexpected/mismatched/errors
    assert not [m for m in msgs if BAD_LOAD.search(m)], msgs
    got = torch_logits(model.eval(), exported.ids)
    rel = record(parity_record, f"export/{exported.family}/merged", got, exported.logits, FP32_TOL)
    assert rel < FP32_TOL
    # The perturbation is visible: the export is not just the source checkpoint again.
    source = torch_logits(hf_causal_lm(exported.source).eval(), exported.ids)
    assert rel_err(source, exported.logits)[2] > 100 * FP32_TOL


def test_peft_adapter_reloads_in_peft(exported, parity_record):
    if exported.adapter is None:
        pytest.skip("full fine-tuning case: no adapter")
    from peft import PeftModel

    config = json.loads((exported.adapter / "adapter_config.json").read_text())
    lora = exported.case.lora
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (
        lora.rank,
        lora.alpha,
        lora.rslora,
    )
    modules = exported.case.peft_modules or lora.targets
    assert sorted(config["target_modules"]) == sorted(modules)
    keys = safetensors_keys(exported.adapter)
    assert keys and not [k for k in keys if ".default." in k or not k.startswith("base_model.")]
    # two per adapted module (or MoE expert parameter) and layer
    n_adapted = len(modules) + len(config.get("target_parameters") or ())
    assert len(keys) == 2 * exported.cfg.num_layers * n_adapted

    base = hf_causal_lm(exported.source)
    peft_model, msgs = load_quietly(lambda: PeftModel.from_pretrained(base, exported.adapter))
    assert not [m for m in msgs if BAD_LOAD.search(m)], msgs
    got = torch_logits(peft_model.eval(), exported.ids)
    rel = record(parity_record, f"export/{exported.family}/peft", got, exported.logits, FP32_TOL)
    assert rel < FP32_TOL


def test_merged_files(exported):
    out, cfg = exported.merged, exported.cfg
    keys = safetensors_keys(out)
    assert all(len(files) == 1 for files in keys.values())  # every key written exactly once
    assert not [k for k in keys if "lora" in k]
    head = "language_model.lm_head.weight" if cfg.outer_config else "lm_head.weight"
    assert (head in keys) == (not cfg.tie_word_embeddings)
    if cfg.outer_config:  # a multimodal wrapper: the vision tower and projector, byte for byte
        carried = [k for k in safetensors_keys(exported.source) if "language_model" not in k]
        assert carried and all(k in keys for k in carried)
        with (
            safe_open(out / "model.safetensors", "np") as new,
            safe_open(exported.source / "model.safetensors", "np") as old,
        ):
            for k in carried:
                assert new.get_slice(k).get_dtype() == old.get_slice(k).get_dtype()
                assert new.get_tensor(k).tobytes() == old.get_tensor(k).tobytes(), k
    index = out / "model.safetensors.index.json"
    if exported.case.max_shard_bytes < 1e6:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        n = len(files)
        assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert weight_map == {k: v[0] for k, v in keys.items()}
    else:
        assert not index.exists() and (out / "model.safetensors").is_file()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "np") as sf:
            assert sf.metadata() == {"format": "pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "torch_dtype" not in config
    assert "rope_parameters" in config.get("text_config", config)  # 5.x style, as the source
    assert (out / "generation_config.json").read_text() == (
        exported.source / "generation_config.json"
    ).read_text()
    assert oct((out).stat().st_mode & 0o777) == oct(exported.source.stat().st_mode & 0o777)


def test_tokenizer_round_trip(exported):
    from transformers import AutoTokenizer

    src = AutoTokenizer.from_pretrained(exported.source, local_files_only=True)
    got = AutoTokenizer.from_pretrained(exported.merged, local_files_only=True)
    assert got.chat_template and got.chat_template == src.chat_template
    assert got.apply_chat_template(MESSAGES, tokenize=False) == src.apply_chat_template(
        MESSAGES, tokenize=False
    )
    text = "Hello world, the assistant said."
    assert got(text)["input_ids"] == src(text)["input_ids"]
    assert (got.eos_token, got.bos_token, got.pad_token) == (
        src.eos_token,
        src.bos_token,
        src.pad_token,
    )


def test_source_dtype_and_config_style(hf_checkpoints, tmp_path, parity_record):
    """bf16 source -> bf16 files (exact round trip); a 4.x config stays 4.x; bf16 on request."""
    model, cfg = jaxsft.load_hf(hf_checkpoints["llama_sharded_bf16"], dtype="float32")
    out = export.export_merged(model, cfg, tmp_path / "bf16")
    for f in out.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    (hf, info), msgs = load_quietly(lambda: hf_causal_lm(out, output_loading_info=True))
    assert all(not v for v in info.values()) and not [m for m in msgs if BAD_LOAD.search(m)]
    ids = np.random.RandomState(3).randint(3, VOCAB, (1, 16))
    want = float32_logits(model, ids)
    rel = record(
        parity_record, "export/llama_sharded_bf16/merged", torch_logits(hf, ids), want, FP32_TOL
    )
    assert rel < FP32_TOL  # bf16 weights loaded to fp32 and written back to bf16: exact

    model, cfg = jaxsft.load_hf(hf_checkpoints["llama_4x_config"], dtype="float32")
    perturb(model, seed=4, lora=False)
    out = export.export_merged(model, cfg, tmp_path / "4x", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "dtype" not in config
    assert "rope_theta" in config and config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_parameters" not in config and config["transformers_version"].startswith("4.")
    (hf, info), msgs = load_quietly(lambda: hf_causal_lm(out, output_loading_info=True))
    assert all(not v for v in info.values()) and not [m for m in msgs if BAD_LOAD.search(m)]
    want = float32_logits(model, ids)
    tol = TOLERANCES["bfloat16"]
    rel = record(
        parity_record, "export/llama_4x_config/merged_bf16", torch_logits(hf, ids), want, tol
    )
    assert rel < tol


def test_failed_export_keeps_old_dir(hf_checkpoints, tmp_path, monkeypatch):
    """A wrong tensor fails the self-check; the previous export and the parent stay intact."""
    source = hf_checkpoints["qwen3"]
    model, cfg = jaxsft.load_hf(source, dtype="float32")
    with pytest.raises(UserError, match="base checkpoint itself"):
        export.export_merged(model, cfg, source, tokenizer_dir=source)
    out = export.export_merged(model, cfg, tmp_path / "hf")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    perturb(model, seed=1, lora=False)
    real = merged._merged_fetch

    def corrupt(model, np_dtype, entry, i):
        value = real(model, np_dtype, entry, i)
        return value + 1 if entry.path == ("norm", "scale") else value

    monkeypatch.setattr(merged, "_merged_fetch", corrupt)
    with pytest.raises(ExportCheckError, match="differ from the in-memory model"):
        export.export_merged(model, cfg, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ---- the command line: error paths (exit code 2, one message naming the directory) ----


def run_main(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        export.main(list(argv))
    return e.value.code, capsys.readouterr().err


def test_cli_missing_run_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    code, err = run_main(capsys, "--run-dir", str(missing))
    assert code == 2 and str(missing) in err and "not found" in err and "Traceback" not in err


def test_cli_incomplete_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    code, err = run_main(capsys, "--run-dir", str(run))
    assert code == 2 and str(run) in err and "config.json" in err
    (run / "config.json").write_text(json.dumps({"lora": {"rank": 0}}))
    code, err = run_main(capsys, "--run-dir", str(run))
    assert code == 2 and "checkpoint" in err and str(run) in err
    (run / "checkpoints" / "5").mkdir(parents=True)
    code, err = run_main(capsys, "--run-dir", str(run), "--step", "7")
    assert code == 2 and "step 7" in err and "5" in err
    code, err = run_main(capsys, "--run-dir", str(run), "--format", "peft")
    assert code == 2 and "LoRA" in err and "--format merged" in err


def test_cli_module_entry_point(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = run_module("jaxsft.export", "--run-dir", str(missing))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_dirs(tmp_path):
    run = tmp_path / "run"
    assert export.output_dirs(run, "merged") == {"merged": run / "hf"}
    assert export.output_dirs(run, "peft") == {"peft": run / "adapter"}
    assert export.output_dirs(run, "both", tmp_path / "d") == {
        "merged": tmp_path / "d" / "hf",
        "peft": tmp_path / "d" / "adapter",
    }
    assert export.output_dirs(run, "merged", tmp_path / "d") == {"merged": tmp_path / "d"}


# ---- multi-host: two processes (2 fake CPU devices each), weights sharded across both ----


@pytest.mark.slow
def test_two_processes_write_what_one_writes(hf_checkpoints, tmp_path):
    """Only process 0 writes; what it gathers equals a one-process export (the adapter byte for
    byte; merged kernels to the last bit, as W + s A B runs on other shard shapes)."""
    import socket

    from export_worker import LORA, set_lora_b
    from safetensors.numpy import load_file

    src = hf_checkpoints["qwen2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    out = tmp_path / "multi"
    worker = str(REPO / "tests" / "export_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(port), str(src), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    model, cfg = jaxsft.load_hf(src, dtype="float32", lora=LORA)
    set_lora_b(model)
    single = tmp_path / "single"
    export.export_merged(model, cfg, single / "hf", tokenizer_dir=src)
    export.export_peft(model, cfg, LORA, single / "adapter", base_model_path=src)
    for name in ("hf/config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    multi, one = (load_file(d / "hf" / "model.safetensors") for d in (out, single))
    assert list(multi) == list(one)
    for key, value in one.items():
        np.testing.assert_allclose(multi[key], value, rtol=0, atol=1e-6 * np.abs(value).max())
