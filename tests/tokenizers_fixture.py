"""Local tokenizers with real-world chat templates, for tests (nothing is downloaded).

    from tokenizers_fixture import make_tokenizer, KINDS
    tok = make_tokenizer("llama3", tmp_dir)  # save_pretrained, reloaded by AutoTokenizer

One byte-level BPE model is trained per process on a small in-test corpus; each kind adds the
special tokens and chat template of a model family:
- "llama3": Llama 3.1 (BOS added by the tokenizer and written by the template, system header
  with "Cutting Knowledge Date", <|start_header_id|>..<|end_header_id|>, <|eot_id|>, content|trim,
  tool turns as JSON under the ipython role);
- "chatml": Qwen2.5 (<|im_start|>/<|im_end|>, default system prompt, tool turns inside a user turn);
- "qwen3": Qwen3 (history rewriting: <think> blocks of assistant turns before the last user
  query are dropped, later turns get a normalised think block);
- "chatml_gen": ChatML with {% generation %} markers around assistant content + <|im_end|>.

MORE_KINDS (their own special tokens are added on top of the shared BPE model, so the ids of
KINDS do not change):
- "gemma2": Gemma 2 instruct (BOS added by the tokenizer and written by the template,
  <start_of_turn>user|model ... <end_of_turn>\n, content|trim, raises "System role not supported");
- "gemma3": Gemma 3 instruct (like Gemma 2; a system message becomes a prefix of the first user
  turn; content lists of {"type": "text"|"image"} parts);
- "phi35": Phi-3.5-mini-instruct (<|user|>\n ... <|end|>\n, eos <|endoftext|> after the last turn,
  no BOS; the role tokens and <|end|> have rstrip=True, as shipped: the newline after them is
  absorbed into the special token and never becomes a token of its own);
- "phi4": Phi-4 14B (<|im_start|>role<|im_sep|> ... <|im_end|>, no newlines, no BOS);
- "phi4mini": Phi-4-mini-instruct (<|role|> ... <|end|>, eos <|endoftext|> after the last turn,
  tools as <|tool|>...<|/tool|> in a system message that has a "tools" key).
"""

# ruff: noqa: E501  (the chat templates are kept verbatim, long lines included)

from __future__ import annotations

import functools
import os
import random

KINDS = ("llama3", "chatml", "qwen3", "chatml_gen")
MORE_KINDS = ("gemma2", "gemma3", "phi35", "phi4", "phi4mini")

SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
]
NON_SPECIAL_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CHATML_GEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

GEMMA2_TEMPLATE = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

PHI35_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"

PHI4_TEMPLATE = "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"

PHI4MINI_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"

# kind -> (template, bos, eos, pad, tokenizer adds BOS)
SPECS = {
    "llama3": (LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", None, True),
    "chatml": (QWEN25_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", False),
    "qwen3": (QWEN3_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", False),
    "chatml_gen": (CHATML_GEN_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", False),
    "gemma2": (GEMMA2_TEMPLATE, "<bos>", "<eos>", "<pad>", True),
    "gemma3": (GEMMA3_TEMPLATE, "<bos>", "<eos>", "<pad>", True),
    "phi35": (PHI35_TEMPLATE, "<s>", "<|endoftext|>", "<|endoftext|>", False),
    "phi4": (PHI4_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|dummy_85|>", False),
    "phi4mini": (PHI4MINI_TEMPLATE, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", False),
}
EOT = {
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "chatml_gen": "<|im_end|>",
    "gemma2": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "phi35": "<|end|>",
    "phi4": "<|im_end|>",
    "phi4mini": "<|end|>",
}
_GEMMA = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
_PHI3_ROLES = ["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
_PHI4MINI_ROLES = ["<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>"]
# kind -> (special tokens added on top of SPECIALS, which of them have rstrip=True)
EXTRA_SPECIALS = {
    "gemma2": (_GEMMA, []),
    "gemma3": (_GEMMA + ["<start_of_image>"], []),
    "phi35": (["<unk>", "<s>", *_PHI3_ROLES], _PHI3_ROLES),
    "phi4": (["<|im_sep|>", "<|dummy_85|>"], []),
    "phi4mini": (_PHI4MINI_ROLES + ["<|tool_call|>", "<|/tool_call|>", "<|tool_response|>"], []),
}

WORDS = (
    "the a of to and in is you that it for on with as are this be at have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time "
    "has look two more write go see number no way could people my than first water been call "
    "who oil its now find long down day did get come made may part hello world assistant user "
    "system tool think answer question python code weather paris sunny function result sorry"
).split()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Small English-like corpus with chat-ish punctuation."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 30))]
        doc = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":\n"])
        docs.append(doc)
    docs += ["system\n", "user\n", "assistant\n", "Cutting Knowledge Date: December 2023\n"] * 20
    return docs


@functools.cache
def _bpe_json() -> str:
    """The shared BPE model, serialized (trained once per process, ~0.5 s)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED])
    return tok.to_str()


def build_tokenizer(kind: str):
    """An in-memory PreTrainedTokenizerFast of the given kind (not saved)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, pad, adds_bos = SPECS[kind]
    tok = Tokenizer.from_str(_bpe_json())
    extra, rstrip = EXTRA_SPECIALS.get(kind, ([], []))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, rstrip=t in rstrip) for t in extra]
    )
    byte_level = processors.ByteLevel(trim_offsets=False)
    if adds_bos:  # like Llama 3: the tokenizer itself prepends <|begin_of_text|>
        bos_id = tok.token_to_id(bos)
        tmpl = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        tok.post_processor = processors.Sequence([byte_level, tmpl])
    else:
        tok.post_processor = byte_level
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    hf.chat_template = template
    return hf


def make_tokenizer(kind: str, tmp_dir: str | os.PathLike):
    """Build, save_pretrained into tmp_dir/kind, reload through AutoTokenizer (cached by path)."""
    return _saved(kind, os.fspath(tmp_dir))


@functools.cache
def _saved(kind: str, tmp_dir: str):
    from transformers import AutoTokenizer

    path = os.path.join(tmp_dir, kind)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        build_tokenizer(kind).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenizer_dir(kind: str, tmp_dir: str | os.PathLike) -> str:
    """Directory holding the saved tokenizer of `kind` (creating it)."""
    make_tokenizer(kind, tmp_dir)
    return os.path.join(os.fspath(tmp_dir), kind)
