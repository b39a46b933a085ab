"""Training: loss parity with transformers, overfitting, schedule, LoRA partitioning,
resume equality, sharded and multi-process equality, and the CLI's errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_utils import FAST, ROOT, losses, run_main, start_two_processes

pytestmark = pytest.mark.filterwarnings("ignore")


def load_config(assets, *overrides):
    os.environ["JAXSFT_DEMO_ASSETS"] = assets
    from jaxsft import config as config_lib

    return config_lib.load(os.path.join(ROOT, "configs", "demo.py"), [*FAST, *overrides])


def first_batch(config):
    from jaxsft.data import pipeline
    from jaxsft.tokenizer import load_tokenizer

    tok = load_tokenizer(config.model.path)
    data = pipeline.build_datasets(config, tok)
    return next(pipeline.train_iterator(data, config, process_index=0, process_count=1))


def trainer_for(config, steps):
    from jaxsft.train import setup

    return setup.compile_steps(setup.build_model_state(config, total_steps=steps), config)


def test_bf16_params_compile_the_step_once(demo_assets, tmp_path):
    """bf16 master weights: AdamW's moments are float32 from the start (the gradients are
    float32 after the division by the token count), so the state keeps its dtypes across steps
    and the step compiles once."""
    config = load_config(
        demo_assets, f"--config.run_dir={tmp_path}", "--config.model.param_dtype=bfloat16"
    )
    batch = first_batch(config)
    trainer = trainer_for(config, 5)
    moments = [x for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    before = jax.tree.map(lambda x: x.dtype, trainer.state)
    with jax.set_mesh(trainer.mesh):
        for _ in range(3):
            trainer.state, _ = trainer.train_step(
                trainer.state,
                trainer.frozen,
                trainer.ref,
                jax.device_put(batch, trainer.batch_sharding),
            )
    assert jax.tree.map(lambda x: x.dtype, trainer.state) == before
    assert {x.dtype for x in jax.tree.leaves(trainer.state["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert trainer.train_step._cache_size() == 1


def test_first_step_loss_matches_transformers(demo_assets, tmp_path):
    """The step-0 loss equals transformers' CE over the same supervised tokens (fp32)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    config = load_config(demo_assets, f"--config.run_dir={tmp_path}", "--config.data.packing=false")
    batch = first_batch(config)
    trainer = trainer_for(config, 5)
    ids = np.asarray(batch["input_ids"])
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.train_step(
            trainer.state,
            trainer.frozen,
            trainer.ref,
            jax.device_put(batch, trainer.batch_sharding),
        )
    hf = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float32).eval()
    attn = torch.tensor(batch["segment_ids"] != 0, dtype=torch.long)
    with torch.no_grad():
        logits = hf(torch.tensor(ids.astype(np.int64)), attention_mask=attn).logits
    labels = torch.tensor(np.where(batch["loss_mask"] == 1, ids, -100).astype(np.int64))
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert abs(float(metrics["loss"]) - float(ref)) < 1e-4 * max(1.0, float(ref)), (
        float(metrics["loss"]),
        float(ref),
    )


def test_overfit_one_batch(demo_assets, tmp_path):
    config = load_config(
        demo_assets,
        f"--config.run_dir={tmp_path}",
        "--config.train.learning_rate=3e-3",
        "--config.train.warmup_ratio=0",
        "--config.train.end_lr_ratio=1.0",
        "--config.train.max_grad_norm=0",
    )
    batch = first_batch(config)
    trainer = trainer_for(config, 60)
    batch = jax.device_put(batch, trainer.batch_sharding)
    with jax.set_mesh(trainer.mesh):
        for _ in range(60):
            trainer.state, metrics = trainer.train_step(
                trainer.state, trainer.frozen, trainer.ref, batch
            )
    assert float(metrics["loss"]) < 0.05, float(metrics["loss"])
    assert float(metrics["mean_token_accuracy"]) == 1.0


def test_schedule_values():
    from jaxsft.train.optim import lr_schedule, warmup_steps

    total, peak = 100, 1e-3
    s = lr_schedule(peak, total, warmup_ratio=0.1, end_ratio=0.1)
    w = warmup_steps(total, 0.1)
    assert w == 10
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(peak * 0.5)
    assert float(s(w)) == pytest.approx(peak)  # warmup end: the peak
    assert float(s(total - 1)) == pytest.approx(peak * 0.1)  # last step: end_lr_ratio x peak
    mid = w + (total - 1 - w) / 2
    assert float(s(mid)) == pytest.approx(peak * 0.1 + peak * 0.9 * 0.5, rel=1e-5)


def test_lora_trains_only_adapters(demo_assets, tmp_path):
    from jaxsft.models.lora import LoRAParam

    config = load_config(
        demo_assets,
        f"--config.run_dir={tmp_path}",
        "--config.lora.rank=4",
        "--config.train.learning_rate=1e-2",
        "--config.train.weight_decay=0.1",
    )
    batch = first_batch(config)
    trainer = trainer_for(config, 3)
    base_before = jax.tree.map(np.asarray, trainer.frozen)
    lora_before = jax.tree.map(np.asarray, trainer.state["params"])
    # the optimizer holds state only for the adapters
    opt_leaves = [x for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim > 0]
    n_lora = sum(x.size for x in jax.tree.leaves(lora_before))
    assert sum(x.size for x in opt_leaves) == 2 * n_lora  # Adam mu and nu
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(trainer.state["params"]))
    batch = jax.device_put(batch, trainer.batch_sharding)
    with jax.set_mesh(trainer.mesh):
        for _ in range(3):
            trainer.state, _ = trainer.train_step(trainer.state, trainer.frozen, trainer.ref, batch)
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(trainer.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # bit for bit
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(lora_before), jax.tree.leaves(trainer.state["params"]), strict=True
        )
    ]
    assert all(changed)


def test_grad_accum_equals_one_big_batch(demo_assets, tmp_path):
    """Accumulating 4 micro-batches gives the same update as the whole batch at once."""
    results = []
    for accum in (1, 4):
        config = load_config(
            demo_assets, f"--config.run_dir={tmp_path}", f"--config.train.grad_accum={accum}"
        )
        batch = first_batch(config)
        trainer = trainer_for(config, 3)
        with jax.set_mesh(trainer.mesh):
            state, m = trainer.train_step(
                trainer.state,
                trainer.frozen,
                trainer.ref,
                jax.device_put(batch, trainer.batch_sharding),
            )
        results.append((float(m["loss"]), jax.tree.map(np.asarray, state["params"])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_kl_to_base_term(demo_assets, tmp_path):
    """KL(fine-tuned || base) is zero while the adapters are zero and positive after training."""
    config = load_config(
        demo_assets,
        f"--config.run_dir={tmp_path}",
        "--config.lora.rank=4",
        "--config.train.kl_to_base=0.5",
        "--config.train.learning_rate=3e-2",
        "--config.train.warmup_ratio=0",
    )
    batch = first_batch(config)
    trainer = trainer_for(config, 4)
    batch = jax.device_put(batch, trainer.batch_sharding)
    kls = []
    with jax.set_mesh(trainer.mesh):
        for _ in range(4):
            trainer.state, m = trainer.train_step(trainer.state, trainer.frozen, trainer.ref, batch)
            kls.append(float(m["kl_to_base"]))
    assert abs(kls[0]) < 1e-6
    assert kls[-1] > 1e-4


SIX_STEPS = ["--config.train.max_steps=6"]


@pytest.fixture(scope="module")
def uninterrupted(demo_assets, tmp_path_factory) -> str:
    """One uninterrupted 6-step run on one device: the reference of the resume and the
    sharded tests (only read by them)."""
    run_dir = str(tmp_path_factory.mktemp("uninterrupted") / "full")
    run_main(demo_assets, run_dir, SIX_STEPS)
    return run_dir


def test_resume_equals_uninterrupted(demo_assets, uninterrupted, tmp_path):
    """Stop after 3 steps, rerun the same command: same per-step losses and final params as
    one uninterrupted 6-step run (data iterator position, optimizer and step restored)."""
    from jaxsft.train.setup import restore_model

    full, part = uninterrupted, str(tmp_path / "part")
    run_main(
        demo_assets,
        part,
        [
            "--config.train.max_steps=6",
            "--config.train.save_every=3",
            "--config.train.stop_after=3",
        ],
    )
    assert sorted(losses(part)) == [1, 2, 3]
    run_main(demo_assets, part, ["--config.train.max_steps=6"])
    lf, lp = losses(full), losses(part)
    assert sorted(lp) == list(range(1, 7))
    for s in range(1, 7):
        assert lp[s] == pytest.approx(lf[s], rel=1e-6, abs=1e-7), (s, lp[s], lf[s])
    mf, *_ = restore_model(full)
    mp, *_ = restore_model(part)
    for a, b in zip(jax.tree.leaves(nnx.state(mf)), jax.tree.leaves(nnx.state(mp)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # a finished run only reports
    proc = run_main(demo_assets, part, ["--config.train.max_steps=6"])
    assert "already finished" in proc.stdout


def test_sharded_8_devices_equals_single(demo_assets, uninterrupted, tmp_path):
    """fsdp=4 x tensor=2 on 8 fake devices: same losses and parameters as one device (the
    6-step run of the resume test)."""
    from jaxsft.train.setup import restore_model

    one, eight = uninterrupted, str(tmp_path / "eight")
    run_main(
        demo_assets,
        eight,
        [*SIX_STEPS, "--config.mesh.fsdp=4", "--config.mesh.tensor=2"],
        devices=8,
    )
    l1, l8 = losses(one), losses(eight)
    assert sorted(l8) == sorted(l1) == list(range(1, 7))
    for s in l1:
        assert l8[s] == pytest.approx(l1[s], rel=2e-5), (s, l1[s], l8[s])
    m1, *_ = restore_model(one)
    m8, *_ = restore_model(eight)
    for a, b in zip(jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m8)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_two_processes_equal_one(demo_assets, tmp_path):
    """Two processes x 2 devices (jax.distributed over gloo), each feeding its own half of
    the batch, give the same losses as one process with 4 devices."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    steps = ["--config.train.max_steps=3"]
    run_main(demo_assets, one, steps, devices=4)
    procs = start_two_processes(demo_assets, two, steps)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    l1, l2 = losses(one), losses(two)
    assert sorted(l2) == sorted(l1)
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=2e-5), (s, l1[s], l2[s])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--config.train.no_such_key=1", "unknown config key 'train.no_such_key'"),
        ("--config.train.batch_size=many", "train.batch_size"),
        ("--config.model.dtype=int4", "model.dtype"),
    ],
)
def test_cli_config_errors_exit_2(demo_assets, tmp_path, override, needle):
    run_dir = tmp_path / "run"
    proc = run_main(demo_assets, str(run_dir), [override], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # a failed start writes nothing


def test_failed_start_keeps_existing_run_dir(demo_assets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops"\n')
    proc = run_main(demo_assets, str(run_dir), [f"--config.data.train={bad}"], check=False)
    assert proc.returncode == 2
    assert f"{bad}:1" in proc.stderr or f"{bad}:2" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert sorted(os.listdir(run_dir)) == ["metrics.jsonl"]


def test_run_dir_files(demo_assets, tmp_path):
    """A short run writes the run-directory files of INTERFACE.md with the documented fields."""
    run_dir = tmp_path / "run"
    run_main(
        demo_assets,
        str(run_dir),
        ["--config.train.max_steps=2", "--config.train.eval_at_start=true"],
    )
    for name in (
        "config.json",
        "data_report.json",
        "metrics.jsonl",
        "checkpoints",
        "loss.png",
        "tensorboard",
    ):
        assert (run_dir / name).exists(), name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    for key in (
        "step",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_sec",
        "supervised_tokens_per_sec",
        "step_time_s",
        "mfu",
        "mean_token_accuracy",
        "data_wait_s",
    ):
        assert key in step_rows[0], key
    assert any("eval_loss" in r for r in rows)
