"""Passkey retrieval: the simplest long-context test (a number hidden in filler text).

The prompt is built in token space so its length is exact, which matters when the point is to
cross a model's trained length::

    [chat header] intro  filler filler ... NEEDLE ... filler  question [chat footer] "The pass key is"
                         |<------------- depth * filler ----->|

Used by the CPU proof (:mod:`vllm_hip.demo`, ``tests/test_hf_passkey.py``) and by the vLLM
benchmarks (which pass ``prompt_token_ids`` from :func:`make_passkey_prompt`).
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
    "passkey_correct",
    "find_passkey",
]

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"


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

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def random_passkey(seed: int, digits: int = 5) -> str:
    """A reproducible key of ``digits`` digits (no leading zero)."""
    rng = random.Random(seed)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


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
    if chat and getattr(tokenizer, "chat_template", None):
        marker = "\x00BODY\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        head_text, tail_text = text.split(marker)
        head = _encode(tokenizer, head_text + INTRO)
        tail = _encode(tokenizer, "\n\n" + QUESTION + tail_text + ANSWER_PREFIX)
    else:
        head = _encode(tokenizer, INTRO)
        tail = _encode(tokenizer, " " + QUESTION + " " + ANSWER_PREFIX)
    filler = _encode(tokenizer, FILLER)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    room = n_tokens - len(head) - len(tail) - len(needle)
    if room < 0:
        raise ValueError(f"n_tokens={n_tokens} is too short for the prompt's fixed parts ({n_tokens - room})")
    units = room // len(filler)
    before = int(round(units * depth))
    ids = head + filler * before
    needle_at = len(ids)
    ids += needle + filler * (units - before) + tail
    return PasskeyPrompt(input_ids=ids, key=key, needle_token=needle_at, depth=depth)


def passkey_correct(answer: str, key: str | int) -> bool:
    """True when the first number in ``answer`` is exactly ``key``."""
    m = re.search(r"\d+", answer)
    return bool(m) and m.group(0) == str(key)


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
