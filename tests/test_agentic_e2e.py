"""A tool-calling run end to end (issue 11): a tiny random Llama with a byte-level BPE tokenizer
and Qwen2.5's tools template, trained with configs/agentic_lora.py on the synthetic
tool-calling conversations of tools/make_synthetic_data.py --tools, and scored by the golden
`tool_call` metric on held-out (phrasing, tool, city) combinations before and after."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qwen2.5's tools template (tokenizers_fixture.QWEN25_FULL_TEMPLATE) with its tool-use intro
# cut to the <tools> block: the same call syntax and tool-result turns, shorter prompts.
QWEN25_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' + tool.function | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TINY = dict(
    vocab_size=768,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TRAIN = [
    "--config.model.dtype=float32",
    "--config.model.param_dtype=float32",
    "--config.model.remat=none",
    "--config.data.max_length=256",
    "--config.train.max_steps=300",
    "--config.train.batch_size=8",
    "--config.train.learning_rate=5e-3",
    "--config.train.warmup_ratio=0.05",
    "--config.train.log_every=20",
    "--config.train.eval_every=0",
    "--config.train.save_every=0",
    "--config.train.eval_at_start=false",
    "--config.lora.rank=0",
    "--config.eval.golden=",
    "--config.export.format=merged",
]


def synthetic():
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_data", os.path.join(ROOT, "tools", "make_synthetic_data.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def build_assets(root) -> dict:
    """Train/golden files, and a tiny Llama whose tokenizer renders tools as Qwen2.5 does."""
    from jaxsft.demo import make_model, make_tokenizer

    syn = synthetic()
    train = syn.tool_rows(1500, seed=0)
    paths = {
        "train": write_jsonl(root / "train.jsonl", train),
        "golden": write_jsonl(root / "golden.jsonl", syn.tool_golden(seed=2)),
        "model": str(root / "model"),
    }
    os.makedirs(paths["model"])
    corpus = [json.dumps(r) for r in train[:300]]
    added = ("<tool_call>", "</tool_call>")
    tok = make_tokenizer(
        paths["model"], corpus, QWEN25_STYLE, added, TINY["vocab_size"], split_words=False
    )
    make_model(paths["model"], tok, shape=TINY)
    return paths


def tool_call_score(model_dir: str, golden_path: str) -> dict:
    import jaxsft
    from jaxsft.evals import golden_eval, load_golden
    from jaxsft.tokenizer import load_tokenizer

    model, _ = jaxsft.load_hf(model_dir, dtype="float32")
    rows = load_golden(golden_path)
    return golden_eval(model, load_tokenizer(model_dir), rows, max_new_tokens=32, batch_size=16)


@pytest.mark.slow
def test_tool_calling_run_learns_held_out_calls(tmp_path):
    from jaxsft import config as config_lib
    from jaxsft.train.loop import run

    t0 = time.perf_counter()
    paths = build_assets(tmp_path)
    before = tool_call_score(paths["model"], paths["golden"])
    config = config_lib.load(
        os.path.join(ROOT, "configs", "agentic_lora.py"),
        [
            f"--config.run_dir={tmp_path / 'run'}",
            f"--config.model.path={paths['model']}",
            f"--config.data.train={paths['train']}",
            "--config.data.eval=",
            *TRAIN,
        ],
    )
    run(config)
    after = tool_call_score(str(tmp_path / "run" / "hf"), paths["golden"])
    report = {
        "before": before["tool_call_accuracy"],
        "after": after["tool_call_accuracy"],
        "names_before": before["tool_call_name_accuracy"],
        "names_after": after["tool_call_name_accuracy"],
        "n": after["n"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "sample": after["rows"][0]["output"],
    }
    print("tool_call e2e:", json.dumps(report))
    with open(tmp_path / "run" / "data_report.json") as f:
        agentic = json.load(f)["train"]["agentic"]
    assert agentic["tool_calls"]["calls"] == 1500 and agentic["template_drops"] == {}
    assert after["tool_call_accuracy"] > before["tool_call_accuracy"]
    assert after["tool_call_accuracy"] >= 0.5
