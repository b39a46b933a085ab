"""One process of the two-process export test (tests/test_export.py): a LoRA model sharded
over the 4 devices of 2 processes (fsdp), exported merged and as a PEFT adapter.

    python tests/export_worker.py PROCESS_ID PORT SOURCE_CHECKPOINT OUT_DIR
"""

from __future__ import annotations

import os
import sys
import warnings

import jax
import numpy as np
from flax import nnx

from jaxsft.models.lora import LoraConfig

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))


def set_lora_b(model: nnx.Module) -> None:
    """Deterministic non-zero lora_b, placed with each variable's (possibly global) sharding."""
    graphdef, state = nnx.split(model)
    for i, (path, var) in enumerate(sorted(nnx.to_flat_state(state))):
        if path[-1] == "lora_b":
            full = np.random.RandomState(i).normal(0.0, 0.1, var.shape).astype(np.float32)
            sharding = var[...].sharding
            var.set_value(jax.make_array_from_callback(full.shape, sharding, full.__getitem__))
    nnx.update(model, state)


def main(pid: int, port: str, src: str, out: str) -> None:
    import jaxsft
    from jaxsft import export
    from jaxsft.sharding import make_mesh

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    model, cfg = jaxsft.load_hf(src, dtype="float32", mesh=make_mesh(1, -1, 1), lora=LORA)
    assert not model.layers.mlp.down_proj.kernel[...].is_fully_addressable
    set_lora_b(model)
    export.export_merged(model, cfg, os.path.join(out, "hf"), tokenizer_dir=src)
    export.export_peft(model, cfg, LORA, os.path.join(out, "adapter"), base_model_path=src)
    jax.distributed.shutdown()


if __name__ == "__main__":
    warnings.simplefilter("ignore", DeprecationWarning)
    main(int(sys.argv[1]), *sys.argv[2:5])
