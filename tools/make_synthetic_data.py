#!/usr/bin/env python3
"""Write N synthetic conversations (OpenAI `messages` JSONL), seeded, for pipeline benchmarks
and for seeing what `python -m jaxsft.data check` reports.

    python tools/make_synthetic_data.py --out /tmp/syn/train.jsonl --n 10000 --seed 0 \
        [--eval-out /tmp/syn/eval.jsonl --n-eval 200]
    python tools/make_synthetic_data.py --tools --out /tmp/agentic/train.jsonl --n 2000 \
        --eval-out /tmp/agentic/eval.jsonl --golden-out /tmp/agentic/golden.jsonl

Conversations are 1-4 turns with an optional system prompt, some tool turns and code blocks.
On purpose about 1% are exact duplicates, 1% near duplicates (one word changed), 0.5% hold
placeholders ("TODO", "lorem ipsum", "{{name}}"), 0.5% have an unbalanced ``` fence and 1% of
the replies are refusals. The eval file (optional) repeats a few training rows (leakage).

--tools writes tool-calling conversations instead, in the OpenAI / TRL layout: the example's
`tools` (TOOLS: weather, local time, population), a user question, the assistant's call
(`tool_calls`, content ""), the `tool` result and the answer that uses it. The right call
follows from the question (which tool, and the city it names). A fixed share of (phrasing,
tool, city) combinations never occurs in training: the eval file and the golden file
(`--golden-out`: `tool_call` rows, the question with the tools, the call expected) draw from
those, so a model scores on calls it has not seen.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random

WORDS = (
    "time person year way day thing world life hand part child eye place work week case point "
    "company number group problem fact system program question home water room area money story "
    "month book word business issue side kind head house service friend power hour game line end "
    "member law car city name team idea body information level office door health art history "
    "party result change reason research moment air force education age policy process music "
    "market sense plan interest experience effect class control field role rate heart model "
    "data token layer kernel matrix vector gradient batch sequence function memory network"
).split()
VERBS = (
    "is has makes takes uses finds gives shows keeps moves builds explains computes stores".split()
)
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are an expert tutor who explains ideas step by step.",
]
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "As an AI language model, I cannot do that.",
    "I cannot assist with this request.",
]


def sentence(rng: random.Random) -> str:
    n = rng.randint(6, 16)
    words = [rng.choice(WORDS if k % 3 else VERBS) for k in range(n)]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(lo, hi)))


def reply(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        code = "\n".join(f"x{k} = {rng.randint(0, 99)}" for k in range(rng.randint(2, 6)))
        return f"{paragraph(rng, 1, 2)}\n```python\n{code}\n```\n{sentence(rng)}"
    return paragraph(rng, 1, 8)


def conversation(rng: random.Random) -> dict:
    msgs = []
    if rng.random() < 0.6:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(rng.choices([1, 2, 3, 4], [0.5, 0.3, 0.15, 0.05])[0]):
        msgs.append({"role": "user", "content": paragraph(rng, 1, 3).rstrip(".") + "?"})
        if rng.random() < 0.05:
            msgs.append({"role": "assistant", "content": "Let me look that up."})
            msgs.append({"role": "tool", "content": json.dumps({"result": sentence(rng)})})
        msgs.append({"role": "assistant", "content": reply(rng)})
    return {"messages": msgs}


def corrupt(rng: random.Random, row: dict, rows: list) -> dict:
    """Turn a fresh row into one of the planted problems (or leave it)."""
    r = rng.random()
    last = row["messages"][-1]
    if r < 0.01 and rows:
        return copy.deepcopy(rng.choice(rows))  # exact duplicate
    if r < 0.02 and rows:
        near = copy.deepcopy(rng.choice(rows))  # near duplicate: one word changed
        words = near["messages"][-1]["content"].split(" ")
        words[rng.randrange(len(words))] = rng.choice(WORDS)
        near["messages"][-1]["content"] = " ".join(words)
        return near
    if r < 0.025:
        last["content"] = rng.choice(["TODO", "Lorem ipsum dolor sit amet.", "Dear {{name}},"])
    elif r < 0.03:
        last["content"] += "\n```python\nprint('unclosed')"
    elif r < 0.04:
        last["content"] = rng.choice(REFUSALS)
    return row


def generate(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    for _ in range(n):
        rows.append(corrupt(rng, conversation(rng), rows))
    return rows


CHUNK = 100_000  # rows generated at a time for large --n (duplicates are drawn within one)


def generate_chunks(n: int, seed: int):
    """`generate(n, seed)` in chunks of CHUNK rows with seeds seed, seed + 7919, ... (one chunk,
    the same rows as generate(n, seed), for n <= CHUNK; a million rows never sit in memory)."""
    for k, lo in enumerate(range(0, n, CHUNK)):
        yield generate(min(CHUNK, n - lo), seed + 7919 * k)


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------
# Tool-calling conversations (--tools)
# --------------------------------------------------------------------------------------------
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Cairo"]
CITY_PARAM = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": d, "parameters": CITY_PARAM}}
    for n, d in (
        ("get_weather", "Weather in a city"),
        ("get_time", "Time in a city"),
        ("get_population", "Population of a city"),
    )
]
# tool -> (question phrasings, answer given the tool result)
ASKS = {
    "get_weather": (
        ["What is the weather in {c}?", "Weather in {c} today?", "Tell me the weather for {c}."],
        "It is {r} in {c}.",
    ),
    "get_time": (
        ["What time is it in {c}?", "Local time in {c}?", "Tell me the time in {c}."],
        "In {c} it is {r}.",
    ),
    "get_population": (
        ["How many people live in {c}?", "Population of {c}?", "Tell me the population of {c}."],
        "About {r} people live in {c}.",
    ),
}
RESULTS = {
    "get_weather": lambda rng: rng.choice(["sunny", "rainy", "cloudy", "windy"]),
    "get_time": lambda rng: f"{rng.randint(0, 23)}:{rng.choice(['00', '15', '30', '45'])}",
    "get_population": lambda rng: f"{rng.randint(1, 14)} million",
}
HELD_OUT = 5  # one (phrasing, tool, city) combination in HELD_OUT is held out of training


def tool_cases(held_out: bool) -> list[tuple[str, str, str]]:
    """(tool, question, city) of every combination on one side of the held-out split."""
    cases = [(tool, q, c) for tool, (qs, _) in ASKS.items() for q in qs for c in CITIES]
    return [x for k, x in enumerate(cases) if (k % HELD_OUT == 0) == held_out]


def tool_conversation(rng: random.Random, case: tuple[str, str, str], k: int) -> dict:
    """One tool-calling conversation: question, call, result, answer."""
    tool, question, city = case
    result, call_id = RESULTS[tool](rng), f"call{k:05d}"
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": tool, "arguments": {"city": city}},
    }
    msgs = [
        {"role": "user", "content": question.format(c=city)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": call_id,
            "name": tool,
            "content": json.dumps({"result": result}),
        },
        {"role": "assistant", "content": ASKS[tool][1].format(r=result, c=city)},
    ]
    return {"tools": TOOLS, "messages": msgs}


def tool_rows(n: int, seed: int, held_out: bool = False) -> list[dict]:
    rng = random.Random(seed)
    cases = tool_cases(held_out)
    return [tool_conversation(rng, rng.choice(cases), k) for k in range(n)]


def tool_golden(seed: int) -> list[dict]:
    """One golden row per held-out combination: the question with the tools, the call expected."""
    rows = []
    for k, case in enumerate(tool_cases(held_out=True)):
        conv = tool_conversation(random.Random(seed + k), case, k)
        call = conv["messages"][1]["tool_calls"][0]["function"]
        rows.append(
            {
                "tools": TOOLS,
                "messages": conv["messages"][:1],
                "expected": call,
                "metric": "tool_call",
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-out", default="")
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--tools", action="store_true", help="tool-calling conversations")
    p.add_argument("--golden-out", default="", help="--tools: held-out tool_call golden rows")
    args = p.parse_args()
    if args.tools:
        return main_tools(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    written = 0
    with open(args.out, "w") as f:
        for rows in generate_chunks(args.n, args.seed):
            f.writelines(json.dumps(row) + "\n" for row in rows)
            written += len(rows)
    print(f"wrote {written} rows to {args.out}")
    if args.eval_out:
        rng = random.Random(args.seed + 1)
        evals = generate(args.n_eval, args.seed + 1)
        for k in range(min(5, len(evals))):  # planted leakage
            evals[k] = copy.deepcopy(rng.choice(rows))
        write_jsonl(args.eval_out, evals)
        print(f"wrote {len(evals)} rows to {args.eval_out}")


def main_tools(args) -> None:
    outs = [(args.out, tool_rows(args.n, args.seed))]
    if args.eval_out:
        outs.append((args.eval_out, tool_rows(args.n_eval, args.seed + 1, held_out=True)))
    if args.golden_out:
        outs.append((args.golden_out, tool_golden(args.seed + 2)))
    for path, rows in outs:
        write_jsonl(path, rows)
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
