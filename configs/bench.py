"""The CPU benchmark against TRL (../shared/bench): the same model, data and settings as
trl_baseline.py: max_length 512, 8 rows a step, lr 2e-5 cosine, warmup 3%, weight decay 0.01,
clip 1.0, assistant-only loss, 12 steps. Assets: JAXSFT_BENCH_ASSETS (make_bench_assets.py)."""

import os

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    assets = os.environ.get("JAXSFT_BENCH_ASSETS", "bench_out/assets")
    c.run_dir = "bench_out/run"
    c.model.path = os.path.join(assets, "model")
    c.data.train = os.path.join(assets, "train.jsonl")
    c.data.max_length = 512
    c.data.packing = True
    c.train.max_steps = 12
    c.train.batch_size = 8
    c.train.learning_rate = 2e-5
    c.train.warmup_ratio = 0.03
    c.train.weight_decay = 0.01
    c.train.max_grad_norm = 1.0
    c.train.log_every = 1
    c.train.eval_at_start = False
    c.train.save_every = 0
    c.export.format = "none"
    c.lora.alpha = 32.0
    return c
