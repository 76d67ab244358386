"""Passkey retrieval: the simplest long-context test (a number hidden in filler text).

The prompt is built in token space so its length is exact, which matters when the point is to
cross a model's trained length::

    [chat header] intro  filler filler ... NEEDLE ... filler  question [chat footer] "The pass key is"
                         |<------------- depth * filler ----->|

Used by the CPU proof (:mod:`vllm_hip.demo`, ``tests/test_hf_passkey.py``) and by the vLLM
benchmarks (which pass ``prompt_token_ids`` from :func:`make_passkey_prompt`).

:func:`make_multikey_prompt` is the RULER-style "multi-key needle in a haystack" variant: several
needles "The special magic number for <word> is: <number>." with distinct words and numbers sit
at depths spread over the filler, and the question asks for one of them (the one at ``depth``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "PasskeyPrompt",
    "make_passkey_prompt",
    "random_passkey",
    "benchmark_passkey",
    "passkey_correct",
    "find_passkey",
    "make_multikey_prompt",
    "multikey_correct",
]

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"

MK_INTRO = (
    "Some special magic numbers are hidden inside a lot of irrelevant text. "
    "Find them and memorize them. I will quiz you about one of them."
)
MK_NEEDLE = " The special magic number for {word} is: {value}."
MK_QUESTION = "What is the special magic number for {word}?"
MK_ANSWER_PREFIX = "The special magic number for {word} is:"
MK_WORDS = (
    "apple", "anchor", "badger", "balloon", "basket", "beacon", "blanket", "bottle", "bracelet",
    "bucket", "butter", "cabinet", "camera", "candle", "canyon", "carpet", "castle", "cherry",
    "circus", "compass", "cookie", "copper", "cotton", "crystal", "dolphin", "dragon", "engine",
    "falcon", "feather", "fiddle", "garden", "giraffe", "guitar", "hammer", "harbor", "helmet",
    "island", "jacket", "kettle", "ladder", "lantern", "lemon", "lizard", "magnet", "marble",
    "meadow", "mirror", "monkey", "needle", "orange", "otter", "paddle", "parrot", "pencil",
    "pepper", "pillow", "planet", "pocket", "rabbit", "ribbon", "rocket", "saddle", "scarf",
    "shovel", "silver", "spider", "spoon", "squirrel", "statue", "summit", "teapot", "ticket",
    "tiger", "tomato", "trumpet", "tunnel", "turtle", "velvet", "violin", "wagon", "walnut",
    "window", "wizard", "zebra",
)
"""Keys of the multi-key task: plain nouns, none of which occurs in the intro, filler or question."""


@dataclass
class PasskeyPrompt:
    """A built prompt and where its needle sits."""

    input_ids: list[int]
    """Token ids of the whole prompt (ends right before the model's answer)."""
    key: str
    """The digits to retrieve."""
    needle_token: int
    """Index of the needle's first token in ``input_ids``."""
    depth: float
    """Requested depth (0 = just after the intro, 1 = just before the question)."""
    query: str | None = None
    """Multi-key task: the word whose number is asked for (None for plain passkey prompts)."""
    distractors: tuple[str, ...] = ()
    """Multi-key task: the other needles' numbers (all distinct from ``key``)."""
    distractor_depths: tuple[float, ...] = ()
    """Multi-key task: the other needles' depths, in the order of ``distractors``."""
    distractor_tokens: tuple[int, ...] = ()
    """Multi-key task: index of each distractor needle's first token in ``input_ids``."""

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def random_passkey(seed: int, digits: int = 5) -> str:
    """A reproducible key of ``digits`` digits (no leading zero)."""
    rng = random.Random(seed)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def benchmark_passkey(length: int, depth: float, rep: int) -> str:
    """The key of prompt ``rep`` at (``length``, ``depth``) in ``benchmarks/passkey.py`` and the
    tools that replay its prompts (``passkey_sweep.py``): one rule, so they ask the same question."""
    return random_passkey(seed=hash((length, depth, rep)) % (2**31))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _frame(
    tokenizer: Any, intro: str, question: str, answer_prefix: str, chat: bool
) -> tuple[list[int], list[int]]:
    """Token ids before the filler (intro) and after it (question, then the answer's opening)."""
    if chat and getattr(tokenizer, "chat_template", None):
        marker = "\x00BODY\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        head_text, tail_text = text.split(marker)
        head = _encode(tokenizer, head_text + intro)
        tail = _encode(tokenizer, "\n\n" + question + tail_text + answer_prefix)
    else:
        head = _encode(tokenizer, intro)
        tail = _encode(tokenizer, " " + question + " " + answer_prefix)
    return head, tail


def _assemble(
    tokenizer: Any,
    n_tokens: int,
    head: list[int],
    tail: list[int],
    needles: Sequence[tuple[float, list[int]]],
) -> tuple[list[int], list[int]]:
    """``head``, whole filler sentences with each ``(depth, needle_ids)`` inserted at its depth,
    ``tail``: at most one filler sentence short of ``n_tokens``. Returns the ids and the index
    of each needle's first token (in the order of ``needles``)."""
    filler = _encode(tokenizer, FILLER)
    room = n_tokens - len(head) - len(tail) - sum(len(n) for _, n in needles)
    if room < 0:
        raise ValueError(f"n_tokens={n_tokens} is too short for the prompt's fixed parts ({n_tokens - room})")
    units = room // len(filler)
    # Filler sentences before each needle; ties keep depth order (then the given order).
    order = sorted(range(len(needles)), key=lambda i: (int(round(units * needles[i][0])), needles[i][0], i))
    ids, done, starts = list(head), 0, [0] * len(needles)
    for i in order:
        before = int(round(units * needles[i][0]))
        ids += filler * (before - done)
        done = before
        starts[i] = len(ids)
        ids += needles[i][1]
    ids += filler * (units - done) + tail
    return ids, starts


def make_passkey_prompt(
    tokenizer: Any,
    n_tokens: int,
    depth: float,
    key: str | int,
    *,
    chat: bool = False,
) -> PasskeyPrompt:
    """Build a passkey prompt of (almost exactly) ``n_tokens`` tokens.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Of the model under test (``apply_chat_template`` is used when ``chat``).
    n_tokens : int
        Target prompt length; the result is within one filler sentence (~25 tokens) below it.
    depth : float
        Where the needle goes within the filler, 0..1.
    key : str or int
        The passkey (digits).
    chat : bool
        Wrap the text in the tokenizer's chat template (user turn; the assistant turn is
        opened with "The pass key is"). Default False: plain text ending with the same phrase,
        which SmolLM2-135M-Instruct answers reliably (dense, 2K tokens: 3/3 plain; 1/3 chat,
        whose answers at depths 0.1/0.5 were "a unique identifier used by the passkey").

    Returns
    -------
    PasskeyPrompt
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    key = str(key)
    if not key.isdigit():
        raise ValueError(f"key={key!r} must be digits")
    head, tail = _frame(tokenizer, INTRO, QUESTION, ANSWER_PREFIX, chat)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    ids, (needle_at,) = _assemble(tokenizer, n_tokens, head, tail, [(depth, needle)])
    return PasskeyPrompt(input_ids=ids, key=key, needle_token=needle_at, depth=depth)


def passkey_correct(answer: str, key: str | int) -> bool:
    """True when the first number in ``answer`` is exactly ``key``."""
    m = re.search(r"\d+", answer)
    return bool(m) and m.group(0) == str(key)


def make_multikey_prompt(
    tokenizer: Any,
    n_tokens: int,
    depth: float,
    seed: int,
    num_needles: int = 4,
    *,
    chat: bool = False,
) -> PasskeyPrompt:
    """RULER-style multi-key needle in a haystack, (almost exactly) ``n_tokens`` tokens.

    ``num_needles`` needles " The special magic number for <word> is: <number>." with distinct
    words (from :data:`MK_WORDS`) and distinct 5-digit numbers, all drawn from ``seed``; the
    question asks for the number of the needle at ``depth``. The distractors sit at
    ``depth + k / num_needles`` (mod 1) for ``k = 1 .. num_needles - 1``: evenly spread, at
    least ``1 / num_needles`` of the filler away from the queried needle (circularly). Prompt
    framing (``chat``) and filler as in :func:`make_passkey_prompt`.

    Returns a :class:`PasskeyPrompt` with ``key`` = the queried number, ``needle_token`` its
    needle's position, ``query`` its word, and ``distractors`` / ``distractor_depths`` /
    ``distractor_tokens`` for the others. Score answers with :func:`multikey_correct`.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if not 1 <= num_needles <= len(MK_WORDS):
        raise ValueError(f"num_needles={num_needles} must be in [1, {len(MK_WORDS)}]")
    rng = random.Random(seed)
    words = rng.sample(MK_WORDS, num_needles)
    values = [str(v) for v in rng.sample(range(10_000, 100_000), num_needles)]
    depths = [depth] + [round((depth + k / num_needles) % 1.0, 6) for k in range(1, num_needles)]
    head, tail = _frame(tokenizer, MK_INTRO, MK_QUESTION.format(word=words[0]),
                        MK_ANSWER_PREFIX.format(word=words[0]), chat)
    needles = [(d, _encode(tokenizer, MK_NEEDLE.format(word=w, value=v)))
               for d, w, v in zip(depths, words, values)]
    ids, starts = _assemble(tokenizer, n_tokens, head, tail, needles)
    return PasskeyPrompt(
        input_ids=ids, key=values[0], needle_token=starts[0], depth=depth, query=words[0],
        distractors=tuple(values[1:]), distractor_depths=tuple(depths[1:]),
        distractor_tokens=tuple(starts[1:]),
    )


def multikey_correct(answer: str, key: str | int) -> bool:
    """True when ``answer`` contains ``key`` as a whole number (RULER's string match, but
    "482130" does not count for "48213")."""
    return str(key) in re.findall(r"\d+", answer)


def find_passkey(
    model: Any,
    tokenizer: Any,
    prompt: PasskeyPrompt | Sequence[int],
    *,
    max_new_tokens: int = 8,
) -> str:
    """Greedy-decode a few tokens after the prompt (``model.generate`` with a DynamicCache);
    returns the decoded continuation."""
    import torch

    ids = prompt.input_ids if isinstance(prompt, PasskeyPrompt) else list(prompt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
