"""`python -m jaxsft.data check --config configs/RUN.py [--show N] [--config.KEY=VALUE ...]`
`python -m jaxsft.data prepare --config configs/RUN.py [--config.KEY=VALUE ...]`

check reads, validates and renders data.train / data.eval exactly as training would (or loads
them from the data cache), writes run_dir/data_report.json and the data cache (creating
run_dir, deleting nothing), prints a summary and, with --show N, N rendered training examples
with the supervised tokens marked. prepare renders into the data cache (data.cache_dir) and
exits, writing nothing else: pre-render once on one machine before a pod job. Both exit 2
(one message, no traceback) on invalid data or when training would refuse to start.
"""

from __future__ import annotations

import argparse
import sys

from jaxsft.config import load
from jaxsft.errors import UserError, run_cli

RESET = "\033[0m"
# How --show marks supervised tokens, by kind (chat.KIND_*): color on a terminal, else brackets.
MARKS = {
    1: ("\033[1;32m", "[[", "]]"),  # answer
    2: ("\033[1;36m", "[[tool:", "]]"),  # tool-call syntax
    3: ("\033[1;35m", "[[reasoning:", "]]"),  # rendered reasoning
}


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="python -m jaxsft.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="write data_report.json and print a summary")
    check.add_argument("--config", required=True, help="ml_collections config file")
    check.add_argument("--show", type=int, default=None, help="print N rendered examples")
    prep = sub.add_parser("prepare", help="render into the data cache (data.cache_dir) and exit")
    prep.add_argument("--config", required=True, help="ml_collections config file")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        raise UserError(f"unknown argument {bad[0]!r}", hint="overrides look like --config.a.b=v")
    return args, rest


def marked(tokenizer, ids, mask, color: bool, kinds=None) -> str:
    """Decoded tokens with the supervised runs wrapped in [[...]] (or green when color); with
    kinds, tool-call runs as [[tool:...]] (cyan) and reasoning as [[reasoning:...]] (magenta)."""
    kinds = [int(m > 0) for m in mask] if kinds is None else [int(k) for k in kinds]
    out, t = [], 0
    while t < len(ids):
        u = t
        while u < len(ids) and kinds[u] == kinds[t]:
            u += 1
        text = tokenizer.decode(ids[t:u], skip_special_tokens=False)
        if kinds[t]:
            code, left, right = MARKS[kinds[t]]
            text = f"{code}{text}{RESET}" if color else f"{left}{text}{right}"
        out.append(text)
        t = u
    return "".join(out)


def agentic_lines(a: dict) -> list[str]:
    """Summary lines of the report's "agentic" section (only what is present)."""
    lines, tc, turns = [], a["tool_calls"], a["turns"]
    if tc["calls"]:
        lines.append(
            f"  tool calls: {tc['calls']} in {tc['examples']} examples ({tc['tokens']} "
            f"supervised tokens); {tc['bad_json_arguments']['count']} with arguments that are "
            f"not JSON, {tc['unknown_functions']['count']} of undefined functions"
        )
    if a["reasoning_tokens"]["count"]:
        r = a["reasoning_tokens"]
        share = 100 * r["share_of_supervised"]
        lines.append(f"  reasoning: {r['count']} tokens ({share:.1f}% of supervised)")
    for reason, d in a["template_drops"].items():
        lines.append(f"  template drops {reason}: {d['count']} examples ({d['policy']})")
    if turns["mode"] != "all":
        lines.append(
            f"  data.turns={turns['mode']}: {turns['conversations']} conversations -> "
            f"{turns['examples']} examples, {turns['tokens']} tokens (one example per "
            f"conversation: {turns['tokens_one_example_per_conversation']})"
        )
    return lines


def summary(report: dict) -> str:
    lines = []
    for name in ("train", "eval"):
        r = report.get(name)
        if not r:
            continue
        tok, sup, pack = r["tokens"], r["supervised_tokens"], r.get("packing")
        lines.append(
            f"{name}: {r['rows_read']} rows read, {r['examples']} examples kept, "
            f"{r['dropped']['count']} dropped"
        )
        for reason, n in r["dropped"]["by_reason"].items():
            lines.append(f"  dropped {n}: {reason}")
        for d in r["dropped"]["rows"][:5]:
            lines.append(f"    {d['where']}: {d['reason']}")
        lines.append(
            f"  tokens/example p50={tok['p50']} p90={tok['p90']} p99={tok['p99']} "
            f"max={tok['max']}; truncated {r['truncated_examples']['count']} examples, "
            f"{r['assistant_turns']['truncated']} of {r['assistant_turns']['count']} "
            "assistant turns"
        )
        lines.append(f"  supervised tokens: {sup['count']} ({100 * sup['share']:.1f}% of tokens)")
        lines += agentic_lines(r["agentic"]) if "agentic" in r else []
        if pack:
            lines.append(
                f"  {'packed' if pack['enabled'] else 'padded'} rows of {pack['max_length']}: "
                f"{pack['rows_per_epoch']} rows/epoch, efficiency {100 * pack['efficiency']:.1f}%, "
                f"{pack['steps_per_epoch']} steps/epoch at batch {pack['batch_size']}"
            )
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


@run_cli
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    config = load(args.config, overrides)
    from jaxsft.data import check, pipeline
    from jaxsft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.model.path)
    if args.command == "prepare":
        return prepare(config, tokenizer)
    show = args.show if args.show is not None else int(config.data.get("show", 0))
    data = pipeline.build_datasets(config, tokenizer, strict=False, show=show)
    path = check.write_report(config.run_dir, data.report)
    pipeline.save_cache(data)
    print(summary(data.report))
    print(f"report: {path}")
    color = sys.stdout.isatty()
    legend = "answer green, tool calls cyan, reasoning magenta" if color else "[[...]]"
    for i in range(min(show, len(data.train))):
        ids, mask = data.train.input_ids[i].tolist(), data.train.loss_mask[i]
        print(f"\n--- {data.train.where[i]} (supervised: {legend})")
        print(marked(tokenizer, ids, mask, color, data.train.kinds[i]))
    check.refuse_to_train(data.report)
    return 0


def prepare(config, tokenizer) -> int:
    """Render data.train / data.eval into the data cache; print its path, key and size."""
    import time

    from jaxsft.data import check, pipeline

    t0 = time.perf_counter()
    data = pipeline.build_datasets(config, tokenizer, strict=False)
    if data.cache is None:  # only when a data path is missing, which rendering refused
        raise UserError("no data cache for this data", where="data.train")
    path = pipeline.save_cache(data, required=True)
    splits = [("train", data.train), ("eval", data.eval)]
    sizes = ", ".join(
        f"{name} {len(ex)} examples {int(ex.lengths.sum())} tokens"
        for name, ex in splits
        if ex is not None
    )
    print(f"data cache: {path}")
    print(f"key: {data.cache.key}")
    print(f"{sizes}; {time.perf_counter() - t0:.1f}s")
    check.refuse_to_train(data.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
