"""The README demo: a tiny Llama learns a synthetic task (parity / last digit of a number) on
the CPU in a few minutes. The model, tokenizer and data are made locally on first use.

Evaluated before and after training by the eval seam (jaxsft/evals): the task's golden set
(should rise) and the built-in multiple-choice sample, configs/mc_sample.jsonl (general
knowledge no amount of this task teaches: accuracy should stay at chance, 0.25, with its
calibration metrics mc_ece and mc_brier beside it)."""

import os

from jaxsft.configs import base

from jaxsft.demo import ensure_assets


def get_config():
    c = base.get_config()
    assets = ensure_assets(os.environ.get("JAXSFT_DEMO_ASSETS", "runs/demo_assets"))
    c.run_dir = "runs/demo"
    c.model.path = os.path.join(assets, "model")
    c.model.dtype = "float32"
    c.data.train = os.path.join(assets, "train.jsonl")
    c.data.eval = os.path.join(assets, "eval.jsonl")
    c.data.max_length = 128
    c.train.max_steps = 300
    c.train.batch_size = 16
    c.train.learning_rate = 3e-3
    c.train.warmup_ratio = 0.05
    c.train.weight_decay = 0.01
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.save_every = 100
    c.eval.golden = os.path.join(assets, "golden.jsonl")
    c.eval.mc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mc_sample.jsonl")
    c.eval.max_new_tokens = 8
    c.export.format = "merged"
    return c
