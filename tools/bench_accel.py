#!/usr/bin/env python3
"""Train-step speed on whatever accelerator is present: Llama-3.2-1B-shaped full SFT and
Llama-3.1-8B-shaped LoRA (and full) SFT, random init (no download), bf16, packed rows.

    python tools/bench_accel.py [--configs NAME,...] [--steps 10] [--warmup 2] [--peak TFLOPS]
                                [--json FILE] [--time-limit 450] [--smoke] [--config.KEY=VALUE ...]

Each configuration runs in its own child process (peak device memory is per process, and an
out-of-memory compile does not take the other configurations with it) through the trainer's
own setup: the run config (configs/base.py + the configuration's keys + --config overrides),
the model of a published config.json built abstractly and sharded as a run shards it
(`plan_memory.abstract_setup`), random weights drawn on the devices in that sharding, the
optimizer state of `setup.init_opt_state`, and the train step of `setup.compile_steps`
(same shardings, donation, remat, attention kernel), compiled ahead of time and timed.
Prints one line per configuration and `BENCH_ACCEL {json}` at the end; --json FILE writes the
same object. MFU is docs/performance.md's formula against the device kind's dense bf16 peak
(`jaxsft.metrics.PEAK_FLOPS`, or --peak TFLOPS per device). --smoke runs tiny shapes on any
backend (the test of this script). Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

LLAMA3_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "vocab_size": 128256,
    "num_key_value_heads": 8,
    "num_attention_heads": 32,
}
# The published config.json files (architecture keys only).
MODELS = {
    "llama32_1b": {
        **LLAMA,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0},
    },
    "llama31_8b": {
        **LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "tie_word_embeddings": False,
        "rope_scaling": LLAMA3_ROPE,
    },
    # --smoke: the same family, tiny
    "smoke": {
        **LLAMA,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "tie_word_embeddings": True,
        "rope_scaling": LLAMA3_ROPE,
    },
}
FULL = {"model.param_dtype": "float32", "lora.rank": 0}
LORA = {"model.param_dtype": "bfloat16", "lora.rank": 16, "lora.alpha": 32.0}
# name -> (model, row length, rows per device and step, trainer config keys). Rows are sized
# to 16k tokens a device and step for 1B and 4k-8k for 8B; the 8B full and LoRA runs share
# rows, remat and mesh (fsdp over every device), so their tokens/s compare directly (the 1.3x
# LoRA target). A name may end in @ATTENTION (one of model.attention's values, e.g.
# 1b_full_2048@pallas_gpu); without it the attention is PLATFORM_ATTENTION's. `8b_full` holds
# fp32 master weights and AdamW moments (16 bytes a parameter, 128 GB for 8B) when the local
# devices have room for them under fsdp, else bf16 weights (12 bytes a parameter: the moments
# stay float32); it is skipped with the reason when even those do not fit (one 80 GB GPU).
CONFIGS = {
    "1b_full_2048": ("llama32_1b", 2048, 8, {**FULL, "model.remat": "none"}),
    "1b_full_8192": ("llama32_1b", 8192, 2, {**FULL, "model.remat": "none"}),
    "8b_lora_2048": ("llama31_8b", 2048, 2, {**LORA, "model.remat": "dots"}),
    "8b_full_2048": ("llama31_8b", 2048, 2, {**FULL, "model.remat": "dots"}),
    "8b_lora_8192": ("llama31_8b", 8192, 1, {**LORA, "model.remat": "dots"}),
    "8b_full_8192": ("llama31_8b", 8192, 1, {**FULL, "model.remat": "dots"}),
    "smoke_full": ("smoke", 128, 2, {**FULL, "model.remat": "none"}),
    "smoke_lora": ("smoke", 128, 2, {**LORA, "model.remat": "dots"}),
}
# Fits ~8 minutes on one H200, compiles included; the targets' configurations first.
DEFAULT = "1b_full_2048,8b_lora_2048,8b_full_2048,1b_full_8192,8b_lora_8192"
SMOKE = "smoke_full,smoke_lora"
ATTENTIONS = ("auto", "xla", "cudnn", "pallas_gpu", "splash")
# jax 0.10's dot_product_attention(implementation=None), model.attention=auto's choice on GPU,
# is XLA's (a [B, N, T, S] score tensor per layer: no fused kernel, and out of memory at 8192
# tokens); cuDNN's fused attention is asked for explicitly. TPU: auto is splash.
PLATFORM_ATTENTION = {"gpu": "cudnn", "cuda": "cudnn", "rocm": "auto", "tpu": "auto", "cpu": "auto"}
MARK = "BENCH_ACCEL_ONE "


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default=None, help=f"comma-separated; default {DEFAULT}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    ap.add_argument("--peak", type=float, default=0.0, help="peak bf16 TFLOP/s per device")
    ap.add_argument("--json", default=None, help="also write the result object to FILE")
    ap.add_argument("--time-limit", type=float, default=450.0, help="seconds for all configs")
    ap.add_argument("--smoke", action="store_true", help=f"tiny shapes: {SMOKE}")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's config
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.json and not args.one and not _own_result(args.json):
        ap.error(f"--json {args.json}: an existing file this tool did not write; name a new one")
    names = (args.configs or (SMOKE if args.smoke else DEFAULT)).split(",")
    unknown = [n for n in names if not known(n)]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    args.names = names
    return args, overrides


def known(name: str) -> bool:
    base, _, attention = name.partition("@")
    return base in CONFIGS and (not attention or attention in ATTENTIONS)


# ---------------------------------------------------------------------------------------------
# The child: one configuration
# ---------------------------------------------------------------------------------------------
def run_config(workdir: str, name: str, overrides: list[str], devices=1, platform="cpu"):
    """The validated run config of one benchmark configuration (model dir: config.json only):
    rows per device x `devices` rows a step, the attention of the name or the platform."""
    from jaxsft import config as config_lib

    base, _, attention = name.partition("@")
    model, length, rows, keys = CONFIGS[base]
    model_dir = os.path.join(workdir, model)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(MODELS[model], f)
    values = {
        "run_dir": os.path.join(workdir, "run"),  # never written
        "model.path": model_dir,
        "model.dtype": "bfloat16",
        "data.train": "unused",  # the batches are synthetic
        "data.max_length": length,
        "train.batch_size": rows * devices,
        "train.grad_accum": 1,
        "model.attention": attention or PLATFORM_ATTENTION.get(platform, "auto"),
        **keys,
    }
    lines = ["from jaxsft.configs import base", "", "def get_config():"]
    lines += ["    c = base.get_config()"] + [f"    c.{k} = {v!r}" for k, v in values.items()]
    lines += ["    return c", ""]
    path = os.path.join(workdir, f"{base}.py")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return config_lib.load(path, overrides)


def random_tree(tree, seed: int):
    """Arrays of the shapes, dtypes and shardings of a pytree of ShapeDtypeStructs, drawn on the
    devices: norms 1, LoRA B 0, everything else N(0, 0.02), like a freshly initialised model."""
    import jax
    import jax.numpy as jnp

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    shardings = treedef.unflatten([x.sharding for _, x in flat])

    def make():
        keys = jax.random.split(jax.random.key(seed), max(len(flat), 1))
        out = []
        for (path, x), k in zip(flat, keys, strict=False):
            where = jax.tree_util.keystr(path)
            if "norm" in where:
                out.append(jnp.ones(x.shape, x.dtype))
            elif "lora_b" in where:
                out.append(jnp.zeros(x.shape, x.dtype))
            else:
                out.append((0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype))
        return treedef.unflatten(out)

    return jax.jit(make, out_shardings=shardings)()


def train_setup(config, mesh):
    """`setup.build_model_state` with random weights: the abstract run state of the planner
    (same split, shardings and optimizer), made concrete on the devices."""

    from jaxsft import plan_memory
    from jaxsft.train import setup as setup_lib

    s = plan_memory.abstract_setup(config, mesh)
    s.state = setup_lib.initial_state(s.tx, random_tree(s.state["params"], 0), mesh, 0)
    s.frozen = random_tree(s.frozen, 1)
    if s.ref is not None:  # train.kl_to_base: the reference copy the step reads
        s.ref = random_tree(s.ref, 2)
    return s


def packed_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    """Rows of `length` tokens filled with documents of T/8 .. T/2 tokens (the last one cut to
    fit), no padding; the loss on the second half of each document."""
    import numpy as np

    rs = np.random.RandomState(seed)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    lo, hi = max(length // 8, 2), max(length // 2, 3)
    for r in range(rows):
        start, doc = 0, 1
        while start < length:
            n = min(int(rs.randint(lo, hi + 1)), length - start)
            seg[r, start : start + n] = doc
            pos[r, start : start + n] = np.arange(n)
            mask[r, start + n // 2 : start + n] = 1
            start, doc = start + n, doc + 1
    ids = rs.randint(0, vocab, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def compiled(s, state, batch):
    """(the train step of `setup.compile_steps` compiled ahead of time for these inputs,
    seconds it took)."""
    t0 = time.perf_counter()
    step = s.train_step.lower(state, s.frozen, s.ref, batch).compile()
    return step, time.perf_counter() - t0


def avals(tree):
    import jax

    return jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)


def device_info() -> dict:
    import jax

    d = jax.local_devices()[0]
    stats = d.memory_stats() or {}
    return {
        "backend": jax.default_backend(),
        "device_kind": d.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "bytes_limit": stats.get("bytes_limit"),
    }


def full_state_bytes_per_param(config) -> int:
    """Master weights + AdamW moments + gradient accumulator, per parameter of a full
    fine-tune. The moments are float32 either way: with bf16 weights the trainer's step
    returns them in float32 (see steady_state)."""
    p = 4 if str(config.model.param_dtype) == "float32" else 2
    return p + 4 + 4 + p


def fit_full_8b(config, overrides, workdir, name, info):
    """(config, None) for an 8B full fine-tune that the local devices can hold (fp32 master
    weights, else bf16), or (None, why) when even bf16 weights and moments do not fit."""
    from jaxsft.metrics import matmul_params
    from jaxsft.models.config import ModelConfig

    if config.lora.rank or CONFIGS[name.partition("@")[0]][0] != "llama31_8b":
        return config, None
    if info["bytes_limit"] is None:
        return config, None
    if any(o.startswith("--config.model.param_dtype=") for o in overrides):
        return config, None  # the user chose
    cfg = ModelConfig.from_hf(config.model.path)
    n = matmul_params(cfg) + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    total = info["bytes_limit"] * info["devices"] * 0.8  # room for activations and the rest
    if n * full_state_bytes_per_param(config) <= total:
        return config, None
    bf16_keys = [*overrides, "--config.model.param_dtype=bfloat16"]
    bf16 = run_config(workdir, name, bf16_keys, info["devices"], info["backend"])
    if n * full_state_bytes_per_param(bf16) <= total:
        return bf16, None
    gb = info["bytes_limit"] * info["devices"] / 1e9
    need = n * full_state_bytes_per_param(bf16) / 1e9
    return None, (
        f"8B full fine-tuning needs {need:.0f} GB for bf16 weights and gradients and float32 "
        f"AdamW moments alone; the {info['devices']} device(s) have {gb:.0f} GB"
    )


def steady_state(s, batch) -> bool:
    """Give the state the dtypes the step returns, so that one compile serves every step
    (True when they differ, and the trainer's jit would compile twice: its second step would
    compile again for the new dtypes). optim.moment_dtypes makes AdamW's moments float32 for
    every parameter dtype, so this is False unless a change breaks that."""
    import jax

    out, _ = jax.eval_shape(s.train_step, s.state, s.frozen, s.ref, batch)
    if avals(out) == avals(s.state):
        return False
    s.state = jax.tree.map(lambda x, o: x.astype(o.dtype), s.state, out)
    return True


def measure(name: str, args, overrides) -> dict:
    """Compile and time one configuration in this process."""
    import jax
    import numpy as np

    from jaxsft import metrics
    from jaxsft.train import setup as setup_lib
    from jaxsft.train.start import check_batch_geometry

    info = device_info()
    model, length, _, _ = CONFIGS[name.partition("@")[0]]
    with tempfile.TemporaryDirectory(prefix="bench_accel_") as workdir:
        config = run_config(workdir, name, overrides, info["devices"], info["backend"])
        config, skipped = fit_full_8b(config, overrides, workdir, name, info)
        if skipped:
            return {"config": name, "skipped": skipped, **info}
        rows = int(config.train.batch_size)
        mesh = setup_lib.config_mesh(config)
        check_batch_geometry(config, mesh)
        t0 = time.perf_counter()
        s = train_setup(config, mesh)
        jax.block_until_ready((s.state, s.frozen))
        init_s = time.perf_counter() - t0
        setup_lib.compile_steps(s, config)
        local = packed_batch(rows // jax.process_count(), length, s.model_cfg.vocab_size)
        batch = {
            k: jax.make_array_from_process_local_data(s.batch_sharding, v) for k, v in local.items()
        }
        with jax.set_mesh(s.mesh):
            recompiles = steady_state(s, batch)
            step, compile_s = compiled(s, s.state, batch)
            state = s.state
            for _ in range(args.warmup):
                state, m = step(state, s.frozen, s.ref, batch)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = step(state, s.frozen, s.ref, batch)
            jax.block_until_ready(state)
            step_s = (time.perf_counter() - t0) / args.steps
        last = {k: float(v) for k, v in jax.device_get(m).items() if np.ndim(v) == 0}
        flops = metrics.step_flops(s.model_cfg, local["segment_ids"])
        flops *= jax.process_count()  # every process holds the same number of rows
        peak = metrics.peak_flops(args.peak)
        tokens = rows * length
        stats = jax.local_devices()[0].memory_stats() or {}
        return {
            "config": name,
            "model": model,
            "row_length": length,
            "rows_per_step": rows,
            "lora_rank": int(config.lora.rank),
            "param_dtype": str(config.model.param_dtype),
            "remat": str(config.model.remat),
            "attention": str(config.model.attention),
            "mesh": {k: int(v) for k, v in s.mesh.shape.items()},
            "parameters": int(metrics.matmul_params(s.model_cfg)),
            "tokens_per_step": tokens,
            "tokens_per_sec": tokens / step_s,
            "tokens_per_sec_per_device": tokens / step_s / info["devices"],
            "step_time_s": step_s,
            "mfu": flops / step_s / peak if math.isfinite(peak) else None,  # None: pass --peak
            "peak_flops_per_device": peak / (1 if info["backend"] == "cpu" else info["devices"]),
            "compile_s": compile_s,
            "trainer_compiles_twice": recompiles,
            "init_s": init_s,
            "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": last.get("loss"),
            "skipped_steps": last.get("skipped"),
            **info,
        }


def child(args, overrides) -> int:
    from jaxsft import distributed

    distributed.maybe_initialize()
    try:
        row = measure(args.one, args, overrides)
    except Exception as e:  # noqa: BLE001 - reported as the configuration's result
        text = str(e).strip().splitlines()
        row = {"config": args.one, "error": f"{type(e).__name__}: {text[0][:300] if text else ''}"}
        row["out_of_memory"] = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
        import jax

        attention = args.one.partition("@")[2]
        row["attention"] = attention or PLATFORM_ATTENTION.get(jax.default_backend(), "auto")
    print(MARK + json.dumps(row), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: one child per configuration, a summary
# ---------------------------------------------------------------------------------------------
def run_child(name: str, args, overrides, timeout: float) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--one", name]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--peak", str(args.peak)]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # JAX's default keeps 25% back
    try:
        proc = subprocess.run(
            [*argv, *overrides], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"killed after {timeout:.0f} s (--time-limit)"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"config": name, "error": f"exit {proc.returncode}: {' | '.join(tail)[:500]}"}


def fallback(row: dict, overrides) -> str | None:
    """A configuration that failed with the platform's attention kernel (not for lack of
    memory) once more with model.attention=auto, so an unattended run still gives a number."""
    name = row["config"]
    chosen = "@" in name or any(o.startswith("--config.model.attention=") for o in overrides)
    if "error" not in row or row.get("out_of_memory") or chosen or row.get("attention") == "auto":
        return None
    return f"{name}@auto"


def line(row: dict) -> str:
    if "skipped" in row or "error" in row:
        return f"{row['config']:<14} {'skipped' if 'skipped' in row else 'ERROR'}: " + (
            row.get("skipped") or row.get("error")
        )
    mem = row["peak_device_memory_bytes"]
    rss = f"n/a (RSS {row['peak_rss_mib']:.0f} MiB)"
    mem = f"{mem / 2**30:.1f} GiB" if mem is not None else rss
    mfu = f"{row['mfu']:6.1%}" if row["mfu"] is not None else "n/a (unknown peak: --peak)"
    return (
        f"{row['config']:<14} {row['tokens_per_sec']:>10.0f} tok/s "
        f"({row['tokens_per_sec_per_device']:.0f}/device)  MFU {mfu}  "
        f"step {row['step_time_s']:.3f} s  compile {row['compile_s']:.1f} s"
        + (" (x2 in the trainer)" if row["trainer_compiles_twice"] else "")
        + f"  peak mem {mem}  [{row['param_dtype']}, remat={row['remat']}, "
        f"{row['rows_per_step']}x{row['row_length']}]"
    )


def summary(rows: list[dict]) -> dict:
    """The LoRA / full ratio of per-device tokens/s at each row length where both ran."""
    done = {}  # base name -> its first row that ran (a fallback's "@auto" row included)
    for r in rows:
        if "tokens_per_sec" in r:
            done.setdefault(r["config"].partition("@")[0], r)
    out = {}
    for length in (2048, 8192):
        lora, full = done.get(f"8b_lora_{length}"), done.get(f"8b_full_{length}")
        if lora and full:
            ratio = lora["tokens_per_sec_per_device"] / full["tokens_per_sec_per_device"]
            out[f"lora_over_full_8b_{length}"] = ratio
    one = done.get("1b_full_2048")
    if one:
        out["1b_full_2048_mfu"] = one["mfu"]
    return out


def _own_result(path: str) -> bool:
    """True when --json may be written: no file there yet, or a result this tool wrote."""
    if not os.path.lexists(path):
        return True
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and {"configs", "summary", "steps"} <= set(old)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.one:
        return child(args, overrides)
    t0, rows = time.perf_counter(), []
    for name in args.names:
        left = args.time_limit - (time.perf_counter() - t0)
        if left < 30:
            row = {"config": name, "skipped": f"--time-limit {args.time_limit:.0f} s reached"}
        else:
            row = run_child(name, args, overrides, left)
        rows.append(row)
        print(line(row), flush=True)
        retry = fallback(row, overrides)
        left = args.time_limit - (time.perf_counter() - t0)
        if retry and left >= 30:
            rows.append(run_child(retry, args, overrides, left))
            print(line(rows[-1]), flush=True)
    result = {
        "configs": rows,
        "summary": summary(rows),
        "steps": args.steps,
        "warmup": args.warmup,
        "overrides": overrides,
        "wall_s": time.perf_counter() - t0,
    }
    for k, v in result["summary"].items():
        print(f"{k}: {v:.3f}" if v is not None else f"{k}: n/a")
    print("BENCH_ACCEL " + json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
