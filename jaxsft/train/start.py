"""The start of a run, before its first write: every check that can refuse it, the model and
steps, and the resume from the newest valid checkpoint.

`prepare` runs in this order: the saved config (a run_dir holding a damaged config.json or
another run is refused), tokenizer and model config (embedding rows cover the tokenizer's ids),
data (rendered, reported, refused when nothing is supervised), evals, export targets, batch
geometry against the mesh, the sharded train state and jitted steps, then the checkpoint to
resume (damaged ones set aside) and the resume guard (trajectory-changing config keys refused).
Only after all of it returns does the loop write config.json, data_report.json and metrics.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax

from jaxsft import config as config_lib
from jaxsft import export as export_lib
from jaxsft import run_dir as rd
from jaxsft import sharding
from jaxsft.checkpoint import Checkpointer, existing_steps
from jaxsft.configs import base as base_config
from jaxsft.data import pipeline
from jaxsft.errors import UserError
from jaxsft.models.config import ModelConfig
from jaxsft.tokenizer import load_tokenizer
from jaxsft.train import setup as setup_lib
from jaxsft.train.evals import Evals


@dataclasses.dataclass
class Start:
    trainer: setup_lib.TrainSetup
    data: pipeline.Datasets
    evals: Evals
    ckpt: Checkpointer
    data_iter: object
    step: int  # the step resumed from (0 for a fresh run)
    total: int
    changes: dict  # config changes against the saved config.json: {key: (old, new)}


def prepare(config) -> Start:
    """Everything a start needs, or a UserError, without writing into run_dir (a damaged
    checkpoint is moved to checkpoints_set_aside/, never deleted)."""
    saved = saved_config(config.run_dir)
    changes = {}
    if saved is not None:  # before anything slow; the step is the newest saved one
        steps = existing_steps(config.run_dir)
        changes = rd.resume_changes(
            saved,
            config,
            step=steps[-1] if steps else 0,
            allow=bool(config.train.allow_config_change),
            where=rd.path(config.run_dir, rd.CONFIG),
            defaults=base_config.get_config(),
        )
    tokenizer = load_tokenizer(config.model.path)
    check_vocab(tokenizer, ModelConfig.from_hf(config.model.path), config.model.path)
    data = pipeline.build_datasets(config, tokenizer)
    data.report["train"]["fingerprint"] = rd.data_fingerprint(data.train)
    if saved is not None:
        changes.update(data_change(config, data))
    evals = Evals(config, data, tokenizer)
    export_lib.check_export_targets(config)
    total = total_steps(config, data)
    mesh = setup_lib.config_mesh(config)
    check_batch_geometry(config, mesh)
    check_expert_axis(ModelConfig.from_hf(config.model.path), mesh)
    trainer = setup_lib.compile_steps(
        setup_lib.build_model_state(config, mesh, total_steps=total), config
    )
    ckpt = Checkpointer(config.run_dir, keep=config.train.keep_checkpoints)
    data_iter = pipeline.train_iterator(data, config)
    step, state = ckpt.restore_newest_valid(trainer.state, data_iter)
    if step is None:
        step, data_iter = 0, pipeline.train_iterator(data, config)  # a failed restore moved it
    else:
        trainer.state = state
        print(f"resumed from {ckpt.manager.directory} at step {step}")
    return Start(trainer, data, evals, ckpt, data_iter, int(step), total, changes)


def saved_config(run_dir):
    """The config.json of an earlier invocation of this run, or None for a new run."""
    path = rd.path(run_dir, rd.CONFIG)
    return config_lib.from_json(path) if os.path.exists(path) else None


def data_change(config, data) -> dict:
    """{"data.train (content)": (old, new)} when the training data rendered differently from
    the run's first start (same paths, other content, tokenizer or template); refused unless
    train.allow_config_change."""
    old = rd.saved_fingerprint(config.run_dir)
    new = data.report["train"]["fingerprint"]
    if old is None or old == new:
        return {}
    if not config.train.allow_config_change:
        raise UserError(
            "resuming with training data that renders differently from the data the run "
            f"trained on (fingerprint {old} -> {new}): a data file, the "
            "tokenizer or its chat template changed",
            where=rd.path(config.run_dir, rd.DATA_REPORT),
            hint="restore the original data, use a new run_dir, or pass "
            "--config.train.allow_config_change=true to continue on the new data",
        )
    return {"data.train (content)": (old, new)}


def check_vocab(tokenizer, model_cfg: ModelConfig, model_path) -> None:
    """Every id the tokenizer can produce must have an embedding row."""
    n = len(tokenizer)
    if n > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {n} token ids but the model's embedding has only "
            f"{model_cfg.vocab_size} rows (vocab_size): ids >= {model_cfg.vocab_size} would "
            "train on garbage",
            where=os.path.join(os.fspath(model_path), "config.json"),
            hint="use the tokenizer that belongs to this checkpoint, or resize the embedding "
            "(transformers' resize_token_embeddings) and save the checkpoint again",
        )


def check_batch_geometry(config, mesh) -> None:
    """The global batch splits over processes and each micro-batch over the batch devices."""
    b, a = int(config.train.batch_size), int(config.train.grad_accum)
    procs = jax.process_count()
    if b % procs:
        raise UserError(
            f"train.batch_size={b} does not split over the {procs} processes",
            where="train.batch_size",
            hint=f"use a multiple of {procs}",
        )
    shards = sharding.batch_devices(mesh.shape)
    if (b // a) % shards:
        raise UserError(
            f"train.batch_size / train.grad_accum = {b} / {a} = {b // a} rows per micro-batch "
            f"do not split over the {shards} devices of mesh.data x mesh.expert x mesh.fsdp "
            f"({' x '.join(str(mesh.shape[a]) for a in sharding.BATCH)})",
            where="train.batch_size",
            hint=f"use a train.batch_size that is a multiple of {a * shards}, or another mesh "
            "(mesh.tensor takes devices off the batch split)",
        )


def check_expert_axis(model_cfg: ModelConfig, mesh) -> None:
    """mesh.expert > 1 splits the experts of an MoE model: it must divide their number."""
    n = int(mesh.shape["expert"])
    if n == 1:
        return
    if not model_cfg.num_experts:
        raise UserError(
            f"mesh.expert={n}, but {model_cfg.model_type} is not a mixture-of-experts model",
            where="mesh.expert",
            hint="use mesh.data or mesh.fsdp to split the batch over those devices",
        )
    if model_cfg.num_experts % n:
        raise UserError(
            f"mesh.expert={n} does not divide the model's {model_cfg.num_experts} experts",
            where="mesh.expert",
            hint="use a divisor of num_experts",
        )


def total_steps(config, data) -> int:
    if config.train.max_steps:
        return int(config.train.max_steps)
    per_epoch = pipeline.steps_per_epoch(data, config)
    return max(1, math.ceil(per_epoch * config.train.num_epochs))
