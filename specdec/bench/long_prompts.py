"""Long-prompt benchmark inputs (4K-32K tokens) built from what ships with Python: no downloads.

A haystack is the standard library's own source files (the ones ``corpus:stdlib`` draws from),
shuffled by a seed and concatenated under ``# file:`` headers, cut to a token budget, with a
question at the end. A needle prompt also hides one fact (a passphrase) at a chosen depth of
the haystack and asks for it; drafters that shorten the context (Rapid) must still give the
target's exact answer.

Lengths count tokens of ``tokenizer`` when one is given (the haystack is cut by tokens), and are
otherwise estimated at ``CHARS_PER_TOKEN`` characters a token (Python source under the zoo's BPE
tokenizers). The builder needs neither ``datasets`` nor a network, so it runs on the GPU machine.
It knows prompts and text, not models or drafters.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from specdec.bench.prompts import Prompt

CHARS_PER_TOKEN = 3.2
QUESTIONS = (
    "Above are several Python standard library source files. Name three functions defined in the "
    "last file and say in one sentence what each does.",
    "Above are several Python standard library source files. Which file defines the most classes? "
    "Answer with its name and a one-line summary of it.",
    "Summarise, in at most five bullet points, what the Python source files above are for.",
)
NEEDLE = "The secret passphrase for the archive is {word}-{number}."
NEEDLE_QUESTION = "What is the secret passphrase for the archive mentioned above? Answer with the passphrase only."
_WORDS = ("amber", "cobalt", "falcon", "juniper", "lantern", "marble", "orchid", "quartz", "saffron", "willow")


def _sources(seed: int) -> list[str]:
    from specdec.training.corpus import _stdlib_files

    files = _stdlib_files()
    random.Random(seed).shuffle(files)
    for path in files:
        try:
            yield f"# file: {path.name}\n{path.read_text(encoding='utf-8')}\n"
        except (UnicodeDecodeError, OSError):
            continue


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (``zoo:NAME``, a folder or an HF id), without the weights."""
    from transformers import AutoTokenizer

    if spec.startswith("zoo:"):
        from specdec.loading import dense_zoo_dir

        return AutoTokenizer.from_pretrained(dense_zoo_dir(spec))
    return AutoTokenizer.from_pretrained(spec)


def needle_answer(seed: int) -> str:
    """The passphrase ``needle_prompt(..., seed=seed)`` hides (it depends on the seed alone)."""
    rng = random.Random(seed)
    return f"{rng.choice(_WORDS)}-{rng.randrange(1000, 10000)}"


def prompt_seed(seed: int, length: int, index: int) -> int:
    """The seed ``long_prompts(seed=seed)`` builds its ``index``-th prompt of ``length`` tokens from."""
    return seed * 1000 + length + index


def _count(text: str, tokenizer) -> int:
    if tokenizer is None:
        return int(len(text) / CHARS_PER_TOKEN)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def haystack(num_tokens: int, seed: int = 0, tokenizer=None) -> str:
    """Standard-library source text of ``num_tokens`` tokens (exact up to re-tokenisation at the cut)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    chars = int(num_tokens * CHARS_PER_TOKEN)
    parts, size = [], 0
    for text in _sources(seed):
        parts.append(text)
        size += len(text)
        if size >= chars * 1.5 + 4096:
            break
    text = "".join(parts)
    if tokenizer is None:
        return text[:chars]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"the standard library holds only {len(ids)} tokens; ask for at most that many")
    return tokenizer.decode(ids[:num_tokens])


def long_prompts(lengths: Sequence[int] = (4096, 8192, 16384, 32768), per_length: int = 2, seed: int = 0,
                 tokenizer=None, needle: bool = False) -> list[Prompt]:
    """``per_length`` prompts of each length (tokens of the whole user turn), category
    ``long_<length>`` (or ``needle_<length>``, the needle at depths spread over 10%..90%).

    ``tokenizer`` may be a model spec (``"zoo:qwen2.5-coder-1.5b-instruct"``), whose tokenizer is
    loaded (``long:tokenizer=zoo:...`` on the bench's command line, so lengths are exact).

    Example: ``long_prompts([4096], per_length=1, tokenizer=tok)`` gives one 4096-token turn.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if per_length < 1 or not lengths or min(lengths) < 256:
        raise ValueError(f"need per_length >= 1 and lengths >= 256 tokens, got {per_length} and {list(lengths)}")
    prompts = []
    for length in lengths:
        for i in range(per_length):
            s = prompt_seed(seed, length, i)
            if needle:
                depth = 0.1 + 0.8 * i / max(1, per_length - 1)
                text, _ = needle_prompt(length, depth, seed=s, tokenizer=tokenizer)
                prompts.append(Prompt(f"needle_{length}_{i}", f"needle_{length}", (text,)))
            else:
                question = "\n\n" + QUESTIONS[s % len(QUESTIONS)]
                body = haystack(length - _count(question, tokenizer), seed=s, tokenizer=tokenizer)
                prompts.append(Prompt(f"long_{length}_{i}", f"long_{length}", (body + question,)))
    return prompts


def needle_prompt(num_tokens: int, depth: float, seed: int = 0, tokenizer=None) -> tuple[str, str]:
    """``(prompt, answer)``: a haystack of about ``num_tokens`` tokens with the needle sentence at
    ``depth`` (0: start, 1: end; at a line boundary up to 200 characters before) and the question after it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    answer = needle_answer(seed)
    fact = "\n# " + NEEDLE.format(word=answer.split("-")[0], number=answer.split("-")[1]) + "\n"
    question = "\n\n" + NEEDLE_QUESTION
    body = haystack(max(1, num_tokens - _count(fact + question, tokenizer)), seed=seed, tokenizer=tokenizer)
    at = int(len(body) * depth)
    line = body.rfind("\n", max(0, at - 200), at + 1)  # a line boundary close before the depth
    cut = line if line >= 0 else at
    return body[:cut] + fact + body[cut:] + question, answer
