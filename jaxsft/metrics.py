"""Host-side logging: metrics.jsonl, TensorBoard events, a progress bar, the loss curve PNG,
and the FLOP count behind MFU (formula in docs/performance.md)."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from jaxsft import run_dir as rd
from jaxsft.errors import WriteFailed

# Dense bf16 peak FLOP/s per device, for MFU. CPU: the measured bf16-input, fp32-accumulate
# 2048^3 matmul peak of the 2-core project machines (NOTES.md); override with train.peak_tflops.
PEAK_FLOPS = {
    "cpu": 380e9,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of all devices together."""
    n = jax.device_count()
    if override_tflops:
        return override_tflops * 1e12 * n
    kind = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else "cpu"
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return flops * (1 if kind == "cpu" else n)
    return float("nan")


def matmul_params(model_cfg) -> int:
    """N of the 6N formula: parameters of the matmuls (all but the input-embedding table; a
    tied unembedding counts as a matmul)."""
    c = model_cfg
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F
    return c.num_layers * per_layer + D * c.vocab_size


def step_flops(model_cfg, segment_ids: np.ndarray) -> float:
    """Model FLOPs of one step (PaLM convention): 6 N per non-pad token plus 12 L N H s^2 per
    sequence of length s (each packed segment counted by its own length)."""
    seg = np.asarray(segment_ids)
    tokens = int((seg != 0).sum())
    lengths = [np.bincount(row[row != 0]) for row in seg]
    sq = float(sum((ln.astype(np.float64) ** 2).sum() for ln in lengths))
    c = model_cfg
    return 6.0 * matmul_params(c) * tokens + 12.0 * c.num_layers * c.num_heads * c.head_dim * sq


class MetricsLogger:
    """Writes metrics.jsonl (main process only), TensorBoard scalars and a progress bar."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled=True):
        self.enabled = enabled
        self.path = rd.path(run_dir, rd.METRICS)
        self.total = total_steps
        self.start_time = time.time()
        self.start_step = start_step
        self.bar = self.tb = None
        if not enabled:
            return
        _truncate_after(self.path, start_step)
        self.tb = _summary_writer(rd.path(run_dir, rd.TENSORBOARD))
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _num(v) for k, v in metrics.items()}}
        append_row(os.path.dirname(self.path), row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if "loss" in row:
            self.bar.set_postfix(
                loss=f"{row['loss']:.4f}" if row["loss"] is not None else "nan",
                lr=f"{row['learning_rate']:.2e}",
                tok_s=f"{row.get('tokens_per_sec', 0):.0f}",
                refresh=False,
            )

    def advance(self, step: int):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def message(self, text: str):
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        png = rd.path(os.path.dirname(self.path), rd.LOSS_PNG)
        try:
            plot_loss(self.path, png)
        except OSError as e:
            raise WriteFailed(f"cannot write the loss plot: {e.strerror or e}", where=png) from None


def _summary_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed (~170 MB of RSS and ~1.4 s here) only to accept torch tensors, which jaxsft
    never logs."""
    import sys

    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir)
    except ImportError:  # tensorboardX is optional
        return None
    finally:
        if block:
            del sys.modules["torch"]


def append_row(run_dir: str, row: dict):
    rd.append_line(rd.path(run_dir, rd.METRICS), {k: _num(v) for k, v in row.items()})


def _num(v):
    """A JSON-able scalar; NaN and infinities become null (metrics.jsonl stays strict JSON)."""
    v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, np.generic) else v
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


def _truncate_after(path: str, step: int):
    """On resume, drop rows logged after the checkpoint we resume from (they are redone); the
    file is replaced in one rename."""
    kept = [row for row in read_rows(path) if row.get("step", 0) <= step]
    if os.path.exists(path):
        rd.atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept))


def read_rows(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a process killed mid-write) is left out."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
    return out


def logged_losses(run_dir: str) -> list[float]:
    """The training losses metrics.jsonl holds, in order (the guard's running median)."""
    rows = read_rows(rd.path(run_dir, rd.METRICS))
    return [float(r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]


def plot_loss(metrics_path: str, out_png: str):
    """Train (and eval) loss against step."""
    if not os.path.exists(metrics_path):
        return
    rows = read_rows(metrics_path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
