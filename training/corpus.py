"""Training prompts made offline: tasks built from the Python standard library and from templates.

Draft heads learn from the target's own answers, so what matters is that the prompts look like
what users ask; the answers come from the target (`responses`). Offline there are only a few
hundred human prompts, so this module writes more, in the built-in benchmark's six kinds,
without using any benchmark prompt:

- coding and editing: real functions from the standard library's sources (``ast``), to explain,
  document, test, fix or refactor;
- summarization and qa: long docstrings of the standard library as passages;
- math: word problems with seeded random numbers;
- chat: explanations and comparisons over a list of everyday and technical topics.

`corpus_rows(size, seed)` is a pure function of its arguments (and of the Python version, whose
sources it reads). A data source ``path: corpus:stdlib`` in `training.data` loads it through
``datasets.Dataset.from_list``.

Example:
    >>> rows = corpus_rows(100, seed=0)
    >>> sorted({r["category"] for r in rows})
    ['chat', 'coding', 'editing', 'math', 'qa', 'summarization']
"""
import ast
import random
import sysconfig
import textwrap
from pathlib import Path

CATEGORIES = ("coding", "editing", "summarization", "qa", "math", "chat")

_CODE_TASKS = {
    "coding": [
        "Explain what this Python function does, step by step.\n\n```python\n{code}\n```",
        "Write pytest unit tests for this function.\n\n```python\n{code}\n```",
        "What are the edge cases this function handles, and which does it miss?\n\n```python\n{code}\n```",
        "Write a docstring for this function in Google style.\n\n```python\n{code}\n```",
        "Translate this Python function into JavaScript.\n\n```python\n{code}\n```",
    ],
    "editing": [
        "Rewrite this function with type hints and clearer variable names. Keep its behaviour.\n\n"
        "```python\n{code}\n```",
        "Refactor this function to be shorter without changing what it returns.\n\n```python\n{code}\n```",
        "Add input validation to this function that raises ValueError with a helpful message.\n\n"
        "```python\n{code}\n```",
        "Add comments to this code explaining each step.\n\n```python\n{code}\n```",
    ],
}
_PASSAGE_TASKS = {
    "summarization": [
        "Summarise the following documentation in two sentences.\n\nDocumentation:\n{text}",
        "Give a bullet-point summary of this text.\n\nText:\n{text}",
        "Explain this documentation in plain words for a beginner.\n\n{text}",
    ],
    "qa": [
        "Answer the question using only the context below.\n\nContext:\n{text}\n\nQuestion: What is the "
        "main purpose described here, and what arguments matter?",
        "Using the passage below, list the conditions under which an error is raised, if any.\n\n"
        "Passage:\n{text}",
        "Read the context and answer: what does `{name}` return?\n\nContext:\n{text}",
    ],
}
_TOPICS = [
    "photosynthesis", "inflation", "compound interest", "the water cycle", "vaccines", "black holes",
    "recursion", "public-key cryptography", "supply and demand", "plate tectonics", "a hash map",
    "the immune system", "machine learning", "version control", "a mortgage", "jet lag", "tides",
    "the greenhouse effect", "sorting algorithms", "time zones", "caching", "electric cars",
    "a credit score", "sleep cycles", "the stock market", "DNS", "composting", "batteries",
    "the Roman Empire", "unit testing", "a budget", "probability", "gravity", "rainbows",
    "remote work", "coffee roasting", "a database index", "the printing press", "bread baking",
    "memory leaks", "bird migration", "solar panels", "a neural network", "the Olympic Games",
]
_CHAT_TASKS = [
    "Explain {a} to a ten-year-old.",
    "What is the difference between {a} and {b}?",
    "Give me three surprising facts about {a}.",
    "Write a short, friendly email inviting a colleague to a talk about {a}.",
    "Write a four-line poem about {a}.",
    "I am preparing a presentation on {a}. Suggest an outline with five sections.",
    "What are common misconceptions about {a}?",
    "Write a short story in which {a} plays an important role.",
]
_ITEMS = ["apples", "notebooks", "tickets", "bottles of water", "pencils", "bus passes", "loaves of bread"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jun"]


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 40), rng.randint(2, 25), rng.randint(2, 9)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kinds = [
        f"{name} buys {a} {item} at ${b} each and pays with a ${(a * b // 50 + 1) * 50} note. How much "
        "change does {name} get? Show your working.".replace("{name}", name),
        f"A train travels {a * 10} km in {c} hours. At the same speed, how far does it go in {c + 2} hours?",
        f"Solve for x: {c}x + {a} = {c * b + a}. Explain each step.",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and its perimeter?",
        f"The price of a jacket is ${a * 5}. It is discounted by {c * 5}% and then taxed at 10%. What is the "
        "final price?",
        f"{name} reads {b} pages a day. How many days does a {a * b + c} page book take? Explain.",
        f"What is the probability of rolling a total of {min(12, c + 3)} with two fair dice?",
        f"A class has {a + 10} students; {b}% of them walk to school. About how many students walk?",
    ]
    return rng.choice(kinds)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) if not p.name.startswith("_")]
    files += sorted(p for p in root.glob("*/*.py") if "test" not in p.parts[-2] and not p.name.startswith("_"))
    return files


def _functions(path: Path):
    """(name, source, docstring) of each function (nested ones included) of 4 to 40 lines."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            count = node.end_lineno - node.lineno + 1
            if 4 <= count <= 40:
                source = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
                yield node.name, source, ast.get_docstring(node) or ""


def corpus_rows(size: int, seed: int = 0) -> list[dict]:
    """``size`` prompts, about a sixth of each kind: [{"prompt", "category"}], seeded."""
    rng = random.Random(seed)
    functions, passages = [], []
    for path in _stdlib_files():
        for name, source, doc in _functions(path):
            functions.append((name, source))
            if len(doc) >= 300:
                passages.append((f"{path.stem}.{name}", doc))
    rng.shuffle(functions)
    rng.shuffle(passages)
    per = -(-size // len(CATEGORIES)) * 5 // 4  # headroom for the duplicates dropped below
    rows = []
    for i in range(per):
        name, code = functions[i % len(functions)]
        for category in ("coding", "editing"):
            rows.append({"prompt": rng.choice(_CODE_TASKS[category]).format(code=code), "category": category})
        name, text = passages[i % len(passages)]
        for category in ("summarization", "qa"):
            prompt = rng.choice(_PASSAGE_TASKS[category]).format(text=text[:1500], name=name)
            rows.append({"prompt": prompt, "category": category})
        rows.append({"prompt": _math_prompt(rng), "category": "math"})
        a, b = rng.sample(_TOPICS, 2)
        rows.append({"prompt": rng.choice(_CHAT_TASKS).format(a=a, b=b), "category": "chat"})
    unique = list({row["prompt"]: row for row in rows}.values())  # a passage can come round twice
    rng.shuffle(unique)
    return unique[:size]
