"""A tiny byte-level BPE tokenizer with the Harmony special tokens, for tests and the CPU demo.

It puts the special tokens first, at fixed ids whatever the corpus (see ``TINY_SPECIAL_TOKENS``), and follows
gpt-oss's HF tokenizer for the roles: bos ``<|startoftext|>``, eos ``<|return|>``, pad ``<|endoftext|>``. Its corpus
holds rendered Harmony conversations, so this module sits above the renderer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ossrl.harmony.chat_template import CHAT_TEMPLATE
from ossrl.harmony.messages import Message
from ossrl.harmony.render import render_conversation_text
from ossrl.harmony.tokenizer import REQUIRED_TOKENS, TINY_SPECIAL_TOKENS

TINY_VOCAB_SIZE = 1536  # at most: digits are never merged, so training stops short (~1260 tokens)
REASONING = ("low", "medium", "high")

_WORDS = (
    "the of and to in is that it for as with was on be by this are from at or an have not which but all they "
    "one can there their more will has if about would when what so no out up into them some could time only new "
    "other then also these two may first any like our over such most its after where very use many how well "
    "between just because each much those both under long still while same need know find give tell work call "
    "think ask answer question number sum total result value step check weather location city today tool user "
    "model problem solve compute write code function return list string file read data test true false error "
    "reason plan first second third next finally therefore so let we need to use output input message final "
    "Alice Bob Tokyo Paris London apples books cars dollars hours minutes days price cost each per percent half "
    "calculator arithmetic expression expressions evaluate Evaluate numbers parentheses Returns Reply Use e.g. "
    "string object type description properties required"
).split()
_HEADER_WORDS = (
    "system developer user assistant analysis commentary final functions json code python browser to=assistant "
    "to=functions.get_weather to=functions.lookup to=python <|constrain|>json Reasoning: low medium high "
    "# Instructions # Tools ## functions namespace functions { } // namespace functions type = (_: { }) => any; "
    "# Valid channels: analysis, commentary, final. Channel must be included for every message. "
    "Calls to these tools must go to the commentary channel: 'functions'. "
    "You are ChatGPT, a large language model trained by OpenAI. Knowledge cutoff: 2024-06 Current date: 2025-06-28"
)
_PYTHON = (
    "def {f}({a}, {b}):\n    return {a} {op} {b}\n",
    "for {a} in range({n}):\n    print({a} {op} {m})\n",
    "import math\n{a} = math.sqrt({n})\nprint(round({a}, 2))\n",
    "{a} = [{n}, {m}, {k}]\nprint(sum({a}) / len({a}))\n",
    "if {a} > {n}:\n    {b} = {a} - {n}\nelse:\n    {b} = {n}\n",
)


def _corpus(seed: int = 0) -> list[str]:
    """Deterministic training text: English-like sentences, arithmetic, JSON, Python and Harmony headers."""
    rng = random.Random(seed)
    lines = [_HEADER_WORDS] * 20
    tool = {"name": "get_weather", "description": "Gets the weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
                           "required": ["city"]}}  # fmt: skip
    for k in range(200):  # whole Harmony conversations, so headers and the system prompt get their own merges
        city, n = rng.choice(["Tokyo", "Paris", "London"]), rng.randint(0, 40)
        convo = [Message.user(f"What is the weather in {city}?"), Message.analysis(f"Need the weather in {city}.")]
        convo += [Message.tool_call("get_weather", {"city": city}), Message.tool_result("get_weather", f"{n} C")]
        convo += [Message.final(f"It is {n} degrees in {city}.")]
        options = dict(tools=[tool] if k % 2 else None, reasoning_effort=REASONING[k % 3], current_date="2025-06-28")
        lines.append(render_conversation_text(convo, add_generation_prompt=False, **options))
    for _ in range(1500):
        words = rng.choices(_WORDS, k=rng.randint(5, 16))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    for _ in range(1500):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op = rng.choice("+-*/")
        res = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 3)}[op]
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {res}. The answer is \\boxed{{{res}}}.")
    for _ in range(600):
        obj = {rng.choice(_WORDS): rng.choice([rng.randint(-50, 500), rng.choice(_WORDS), True, None, 1.5])
               for _ in range(rng.randint(1, 4))}  # fmt: skip
        lines.append(json.dumps(obj) if rng.random() < 0.5 else json.dumps(obj, separators=(",", ":")))
    for _ in range(600):
        names = rng.sample(["x", "y", "n", "total", "count", "result", "value", "items", "i"], 2)
        lines.append(rng.choice(_PYTHON).format(
            f=rng.choice(["add", "solve", "area", "mean"]), a=names[0], b=names[1], op=rng.choice("+-*/%"),
            n=rng.randint(0, 100), m=rng.randint(0, 100), k=rng.randint(0, 100),
        ))  # fmt: skip
    return lines


def build_tiny_tokenizer(save_dir: str | Path | None = None, *, vocab_size: int = TINY_VOCAB_SIZE) -> Any:
    """A small byte-level BPE tokenizer with the Harmony special tokens (ids 0-8) and a Harmony chat template.

    Deterministic: the corpus is generated from a fixed seed, so two builds have the same vocab and merges.
    Saved in transformers format (``AutoTokenizer.from_pretrained(save_dir)``) when ``save_dir`` is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # Digits one token each, as the same token wherever a number appears (" 16", "16\"" ...): copying a number from
    # a question into a tool call is then token-for-token, which a tiny model learns quickly.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(REQUIRED_TOKENS),
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    assert [tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS] == list(range(len(TINY_SPECIAL_TOKENS)))
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
