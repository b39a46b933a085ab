"""Run configuration: load an ml_collections config file, apply overrides, validate, lock.

    cfg = load("configs/run.py", ["--config.train.learning_rate=1e-4"])

Every key must exist in `configs/base.py` (shipped as `jaxsft.configs.base`); unknown keys and
ill-typed or out-of-range values are UserErrors (exit code 2 from the CLIs).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys

import ml_collections

from jaxsft.configs import base as base_config
from jaxsft.errors import UserError

CHOICES = {
    "model.dtype": ("bfloat16", "float32", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("auto", "xla", "cudnn", "pallas_gpu", "splash"),
    "model.quantize": ("", "none", "int8", "nf4"),
    "data.on_invalid": ("error", "skip"),
    "export.format": ("merged", "peft", "both", "none"),
    "export.dtype": ("source", "bfloat16", "float32", "float16"),
}
MIXABLE = ("data.train", "data.eval")
POSITIVE = (
    "model.unroll_layers",
    "data.max_length",
    "train.batch_size",
    "train.grad_accum",
    "train.learning_rate",
    "train.loss_chunk",
    "train.max_bad_steps",
)
NON_NEGATIVE = (
    "train.max_steps",
    "train.num_epochs",
    "train.warmup_ratio",
    "train.end_lr_ratio",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.kl_to_base",
    "train.stop_after",
    "train.peak_tflops",
    "train.divergence_factor",
    "lora.rank",
    "eval.max_rows",
    "data.workers",
)


def load(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Read a config file (`get_config()`), apply `--config.a.b=v` overrides, validate, lock."""
    cfg = _read_file(path)
    base = base_config.get_config()
    _check_keys(cfg, base, path)
    for item in overrides:
        _apply_override(cfg, base, item)
    validate(cfg, path)
    cfg.lock()
    return cfg


def _read_file(path: str) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise UserError(
            "config file not found",
            where=path,
            hint="pass --config configs/RUN.py (see configs/base.py for the keys)",
        )
    name = "jaxsft_run_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
        cfg = module.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken config file is user input
        raise UserError(
            f"cannot evaluate the config file: {type(e).__name__}: {e}", where=path
        ) from None
    finally:
        sys.path.pop(0)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UserError("get_config() must return an ml_collections.ConfigDict", where=path)
    return ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)  # unlocked copy


def _check_keys(cfg, base, where, prefix=""):
    for key in cfg.keys():
        full = prefix + key
        if key not in base:
            raise UserError(
                f"unknown config key {full!r}",
                where=where,
                hint="see configs/base.py for every key",
            )
        if isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(cfg[key], ml_collections.ConfigDict):
                raise UserError(f"config key {full!r} must be a group of keys", where=where)
            _check_keys(cfg[key], base[key], where, full + ".")
        else:
            _check_type(full, cfg[key], base[key], where)


def _check_type(key, value, default, where=None):
    """A value must have its default's type; ints pass for floats, lists for tuples, and
    data.train / data.eval also take a list of {path, weight}."""
    if isinstance(default, bool) or not isinstance(default, (int, float, str, tuple)):
        ok = isinstance(value, type(default))
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list))
    else:
        ok = isinstance(value, str) or (key in MIXABLE and isinstance(value, (list, tuple)))
    if not ok:
        raise UserError(
            f"config key {key!r} takes a {type(default).__name__}, got {value!r}", where=where
        )


def _apply_override(cfg, base, item: str):
    if not item.startswith("--config.") or "=" not in item:
        raise UserError(
            f"cannot parse argument {item!r}",
            hint="overrides look like --config.train.learning_rate=1e-4",
        )
    key, raw = item[len("--config.") :].split("=", 1)
    *groups, leaf = key.split(".")
    node, ref = cfg, base
    for g in groups:
        if g not in ref or not isinstance(ref[g], ml_collections.ConfigDict):
            raise UserError(f"unknown config key {key!r}", hint="see configs/base.py")
        node, ref = node[g], ref[g]
    if leaf not in ref or isinstance(ref[leaf], ml_collections.ConfigDict):
        raise UserError(f"unknown config key {key!r}", hint="see configs/base.py")
    node[leaf] = _parse_value(key, raw, ref[leaf])
    _check_type(key, node[leaf], ref[leaf])


def _parse_value(key, raw: str, default):
    """Parse `raw` to the type of the base default (str stays str; lists via Python literals)."""
    if isinstance(default, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"config key {key!r} takes true or false, got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(default, str) and not isinstance(value, list):
        return raw
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, (list, str)):
        value = tuple(value) if isinstance(value, list) else tuple(raw.split(","))
    return value


def validate(cfg, where=None):
    """Range and choice checks on the values (types are checked by ml_collections)."""
    _check_complete(cfg, base_config.get_config(), where)

    def get(key):
        node = cfg
        for part in key.split("."):
            node = node[part]
        return node

    for key, choices in CHOICES.items():
        if get(key) not in choices:
            raise UserError(f"{key} must be one of {choices}, got {get(key)!r}", where=where)
    for key in POSITIVE:
        if not get(key) > 0:
            raise UserError(f"{key} must be > 0, got {get(key)!r}", where=where)
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise UserError(f"{key} must be >= 0, got {get(key)!r}", where=where)
    _check_schedule(cfg.train, where)
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise UserError("train.batch_size must be a multiple of train.grad_accum", where=where)
    if not cfg.model.path:
        raise UserError(
            "model.path is not set", where=where, hint="point it at a local HF checkpoint directory"
        )
    if not cfg.data.train:
        raise UserError("data.train is not set", where=where)
    _check_data_specs(cfg.data, where)
    _check_lora(cfg, where)
    if os.path.exists(cfg.run_dir) and not os.path.isdir(cfg.run_dir):
        raise UserError(
            f"run_dir {cfg.run_dir!r} is an existing file, not a directory",
            where=where,
            hint="set run_dir to a new or an existing run directory",
        )


def _check_complete(cfg, base, where, prefix=""):
    """Every key of configs/base.py is present (a config built from scratch may lack some)."""
    for key in base.keys():
        if key not in cfg:
            raise UserError(
                f"config key {prefix + key!r} is missing",
                where=where,
                hint="start get_config() from jaxsft.configs.base: c = base.get_config()",
            )
        if isinstance(base[key], ml_collections.ConfigDict):
            _check_complete(cfg[key], base[key], where, prefix + key + ".")


def _check_schedule(train, where):
    """Shares of the run and ratios that only make sense in a range."""
    checks = (
        ("train.warmup_ratio", 0 <= train.warmup_ratio < 1, "in [0, 1) (a share of the steps)"),
        ("train.end_lr_ratio", 0 <= train.end_lr_ratio <= 1, "in [0, 1] (a share of the peak)"),
        (
            "train.divergence_factor",
            train.divergence_factor == 0 or train.divergence_factor > 1,
            "0 (off) or > 1 (a multiple of the running median loss)",
        ),
    )
    for key, ok, expected in checks:
        if not ok:
            value = train[key.split(".")[1]]
            raise UserError(f"{key} must be {expected}, got {value!r}", where=where)


def _check_data_specs(data, where):
    """data.train / data.eval mixture lists are well formed (each entry a path and a weight)."""
    from jaxsft.data.readers import parse_sources

    for key in ("train", "eval"):
        try:
            parse_sources(data[key])
        except UserError as e:
            raise UserError(f"data.{key}: {e.message}", where=where, hint=e.hint) from None


def _check_lora(cfg, where):
    from jaxsft.models.lora import TARGET_NAMES as ALL_TARGETS

    bad = [t for t in cfg.lora.targets if t not in ALL_TARGETS]
    if bad:
        raise UserError(
            f"lora.targets: unknown module {bad[0]!r}",
            where=where,
            hint=f"choose among {', '.join(ALL_TARGETS)}",
        )
    if cfg.lora.rank > 0 and not cfg.lora.targets:
        raise UserError(
            f"lora.rank={cfg.lora.rank} with lora.targets=() would train no parameter",
            where=where,
            hint=f"name the modules to adapt in lora.targets ({', '.join(ALL_TARGETS)}), "
            "or set lora.rank=0 for full fine-tuning",
        )
    if quantize(cfg) and lora_config(cfg) is None:
        raise UserError(
            f"model.quantize={cfg.model.quantize} quantises the frozen base of a LoRA run, "
            "but lora.rank is 0 (full fine-tuning trains every weight)",
            where=where,
            hint="set lora.rank > 0 for QLoRA, or model.quantize='' to fine-tune in full",
        )
    if cfg.export.format in ("peft", "both") and lora_config(cfg) is None:
        raise UserError(
            f"export.format={cfg.export.format} needs a LoRA run (lora.rank > 0)",
            where=where,
            hint="use export.format=merged for full fine-tuning",
        )


def lora_config(cfg):
    """The LoraConfig of a run config (a ConfigDict or the dict of a saved config.json), or
    None for full fine-tuning (lora.rank 0). The one place that decides "is this a LoRA run"."""
    from jaxsft.models.lora import LoraConfig

    lora = cfg["lora"]
    if int(lora["rank"] or 0) <= 0:
        return None
    return LoraConfig(
        rank=int(lora["rank"]),
        alpha=float(lora["alpha"]),
        targets=tuple(lora["targets"]),
        rslora=bool(lora.get("rslora", False)),
        train_router=bool(lora.get("train_router", False)),
    )


def quantize(cfg) -> str:
    """model.quantize of a run config (ConfigDict or a saved config.json's dict): "int8",
    "nf4", or "" when off ("none", or a run saved before the key existed)."""
    value = str(cfg["model"].get("quantize", "") or "")
    return "" if value == "none" else value


def to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(path: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved (run_dir/config.json)."""
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read the run's config: {e}",
            where=path,
            hint="the run directory is damaged; use a new run_dir",
        ) from None
