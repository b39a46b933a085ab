"""jaxsft: supervised fine-tuning of Llama/Qwen/Mistral/Gemma models in JAX/Flax.

model, cfg = jaxsft.load_hf(path, dtype="float32")
shapes = jaxsft.model_shapes(path_or_config_dict)   # {state path: ShapeDtypeStruct}, no memory
logits = model(input_ids)                    # [B, T, V]
rendered = jaxsft.data.render(tokenizer, example)
texts = jaxsft.generate(model, tokenizer, conversations, max_new_tokens=64)
"""

import os
from importlib import import_module

# jaxsft uses transformers only for configs, tokenizers and chat templates: its advice that
# PyTorch is missing is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
__all__ = ["load_hf", "model_shapes", "generate", "data", "ModelConfig"]


def __getattr__(name):  # lazy: `import jaxsft` stays cheap and does not import jax
    if name in ("load_hf", "model_shapes"):
        return getattr(import_module("jaxsft.hf_io"), name)
    if name == "ModelConfig":
        return import_module("jaxsft.models.config").ModelConfig
    if name == "generate":
        return import_module("jaxsft.evals.sample").generate
    if name == "data":
        return import_module("jaxsft.data")
    raise AttributeError(f"module 'jaxsft' has no attribute {name!r}")
