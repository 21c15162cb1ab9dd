"""Everything README.md names exists: imports, functions, CLI entry points and flags, Hydra config
names and keys, files, make targets, and the drafter table matches the drafters package.

Nothing here runs a model: it checks names, so a renamed module, option or config breaks the
test instead of a newcomer's first command.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import specdec
import specdec.drafters as drafters
from specdec.api import SpecDecoder
from specdec.engine import SpecEngine
from specdec.state import DecodeState
from specdec.stats import SpecStats
from specdec.verifiers.acceptance import StepOutcome

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text(encoding="utf-8")


def entry_points_and_extras() -> tuple[dict[str, str], set[str]]:
    """``[project.scripts]`` and the extras, from pyproject.toml (Python < 3.11: the installed metadata)."""
    try:
        import tomllib
    except ImportError:
        scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
                   if e.value.startswith("specdec.")}
        return scripts, set(metadata.metadata("specdec").get_all("Provides-Extra") or [])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project["scripts"], set(project["optional-dependencies"])


SCRIPTS, EXTRAS = entry_points_and_extras()
CONF = ROOT / "conf"
GROUPS = {p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_")}
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.M))
FOLDERS = ("specdec", "drafters", "verifiers", "kernels", "training", "conf", "tests", "scripts", "docs", ".ci")
# Hydra entry points, by how a README command starts, and the primary config each composes.
HYDRA = {("specdec", "generate"): "generate", ("specdec", "train"): "train", ("specdec", "bench"): "bench",
         ("specdec-train",): "train", ("specdec-bench",): "bench", ("-m", "specdec.training.entry"): "train"}
# Objects that README prose refers to through the names its examples bind.
PREFIXES = {"out.spec_stats": SpecStats, "spec_stats": SpecStats, "spec.engine": SpecEngine, "outcome": StepOutcome,
            "state": DecodeState, "spec": drafters.DraftSpec}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", TEXT, flags=re.S)


def inline_code() -> list[str]:
    """Backticked spans outside fenced blocks (a span may wrap onto the next line)."""
    prose = re.sub(r"```.*?```", "", TEXT, flags=re.S)
    return [re.sub(r"\s*\n\s*", " ", s) for s in re.findall(r"`([^`]+)`", prose)]


def resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module in {dotted!r}")


def has(cls, name: str) -> bool:
    fields = getattr(cls, "__dataclass_fields__", {})
    return name in fields or hasattr(cls, name)


# ---------------------------------------------------------------- python blocks
def python_names(code: str) -> list[str]:
    """Dotted names a block imports or reads through an imported name, e.g. ``specdec.wrap``."""
    tree = ast.parse(code)
    bound: dict[str, str] = {}
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:   # import a.b as c: c is a.b
                    bound[a.asname] = a.name
                else:          # import a.b: binds a
                    bound[a.name.split(".")[0]] = a.name.split(".")[0]
                names.append(a.name)
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
                names.append(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, inner = [], node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in bound:
                names.append(".".join([bound[inner.id], *reversed(chain)]))
    return names


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_names_resolve(index):
    code = blocks("python")[index]
    for name in python_names(code):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            pytest.fail(f"README python block {index}: {name} does not exist ({e})")


# ---------------------------------------------------------------- commands
def command_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        joined = block.replace("\\\n", " ")   # continuation lines
        lines += [ln for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    start = re.compile(r"(make|specdec(-\w+)?|python3?|pip|\.venv/bin/\S+|source|torchrun|[A-Z_]+=\S+)(\s|$)")
    lines += [c for c in inline_code() if start.match(c)]
    return lines


def split_sweep(value: str) -> list[str]:
    """``a,b`` -> [a, b]; commas inside brackets or braces stay."""
    out, depth, cur = [], 0, ""
    for ch in value:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def hydra_config(argv: list[str]) -> tuple[str | None, list[str]]:
    for start, config in HYDRA.items():
        for i in range(len(argv) - len(start) + 1):
            if tuple(argv[i: i + len(start)]) == start:
                return config, argv[i + len(start):]
    return None, []


def check_hydra(config: str, args: list[str]) -> None:
    """Compose ``config`` with the command's overrides, one swept value at a time."""
    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.startswith("hydra.")]
    flags = [a for a in args if "=" not in a]
    assert set(flags) <= {"-m", "--multirun", "--help"}, f"unexpected arguments {flags} for {config}"
    choices = [split_sweep(o.split("=", 1)[1]) if "-m" in flags else [o.split("=", 1)[1]] for o in overrides]
    keys = [o.split("=", 1)[0] for o in overrides]
    runs = {tuple(c[0] for c in choices)}
    for i, values in enumerate(choices):
        for v in values:
            runs.add(tuple(v if j == i else c[0] for j, c in enumerate(choices)))
    with initialize_config_module("specdec.conf", version_base=None):
        for run in runs:
            compose(config, overrides=[f"{k}={v}" for k, v in zip(keys, run)])


def check_command(line: str) -> None:
    argv = shlex.split(line, comments=True)
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):   # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return
    cmd = argv[0].removeprefix(".venv/bin/")
    if cmd == "make":
        assert set(argv[1:]) <= MAKE_TARGETS, f"make targets {argv[1:]} not all in the Makefile ({MAKE_TARGETS})"
        return
    if cmd == "pip":
        for extra in re.findall(r"\.\[([\w,-]+)\]", line):
            assert set(extra.split(",")) <= EXTRAS, f"pip extra [{extra}] is not in pyproject"
        return
    if cmd == "source":
        assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
        return
    if cmd.startswith("specdec"):
        assert cmd in SCRIPTS, f"{cmd} is not a [project.scripts] entry point"
        resolve(SCRIPTS[cmd].replace(":", "."))
        if cmd == "specdec" and len(argv) > 1 and not argv[1].startswith("-"):
            from specdec.cli import COMMANDS

            assert argv[1] in COMMANDS, f"specdec {argv[1]}: not a command ({list(COMMANDS)})"
    source = None
    if cmd in ("python", "python3", "torchrun") and "-m" in argv:
        module = argv[argv.index("-m") + 1]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"python -m {module}: no such module"
        source = Path(spec.origin).read_text(encoding="utf-8")
    elif cmd in ("python", "python3") and argv[1].endswith(".py"):
        assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
        source = (ROOT / argv[1]).read_text(encoding="utf-8")
    elif cmd == "specdec-datastore":
        source = Path(inspect.getsourcefile(resolve(SCRIPTS[cmd].split(":")[0]))).read_text(encoding="utf-8")
    config, rest = hydra_config(argv)
    if config is not None:
        check_hydra(config, rest)
    elif source is not None:   # an argparse entry: every --flag the README passes is declared
        for flag in (a.split("=")[0] for a in argv if a.startswith("--") and a not in ("--help",)):
            assert f'"{flag}"' in source or f"'{flag}'" in source, f"{line}: {flag} is not an option there"


@pytest.mark.parametrize("line", command_lines())
def test_command_exists(line):
    check_command(line)


def test_commands_cover_every_entry_point_and_method():
    """The README shows every installed command, and specdec-train with each training method."""
    lines = command_lines()
    for name in SCRIPTS:
        assert any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", ln) for ln in lines), f"README never shows {name}"
    for method in ("distill", "eagle", "medusa", "kangaroo"):
        assert any("specdec-train" in ln and f"method={method}" in ln for ln in lines), method
    for target in ("demo", "test"):
        assert f"make {target}" in TEXT
    assert "pip install -e ." in TEXT and "Two commands do all the set-up" in TEXT


# ---------------------------------------------------------------- prose
def prose_references() -> list[str]:
    refs = []
    for span in inline_code():
        refs += re.findall(r"\b(?:specdec|spec_stats|out\.spec_stats|spec\.engine|outcome|state|spec)"
                           r"(?:\.[A-Za-z_]\w*)+", span)
        refs += [m for m in re.findall(r"\b([A-Z]\w+\.[a-z_]\w*)\b", span)]
    return sorted(set(refs))


@pytest.mark.parametrize("ref", prose_references())
def test_prose_reference_exists(ref):
    for prefix, cls in sorted(PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if ref.startswith(prefix + "."):
            attr = ref[len(prefix) + 1:].split(".")
            assert has(cls, attr[0]), f"README's `{ref}`: {cls.__name__} has no {attr[0]}"
            return
    head, _, rest = ref.partition(".")
    if head == "specdec":
        resolve(ref)
        return
    owners = [m for m in (specdec, drafters, importlib.import_module("specdec.verifiers")) if hasattr(m, head)]
    if not owners:   # not one of ours (e.g. an HF class): nothing to check
        return
    obj = getattr(owners[0], head)
    for name in rest.split("."):
        assert has(obj, name), f"README's `{ref}`: {head} has no {name}"
        obj = getattr(obj, name)


def paths() -> list[str]:
    found = set()
    for span in inline_code() + [w for ln in command_lines() for w in shlex.split(ln, comments=True)]:
        for word in span.split():
            word = word.strip("`,;:()")
            if word.startswith(tuple(f + "/" for f in FOLDERS)) and not re.search(r"[<>*]|\.\.\.|…", word):
                found.add(word)
    return sorted(found)


@pytest.mark.parametrize("path", paths())
def test_path_exists(path):
    assert (ROOT / path).exists(), f"README names {path}, which does not exist"


def inline_overrides() -> list[tuple[str, str]]:
    out = []
    for span in inline_code():
        for key, value in re.findall(r"(?:^|\s)\+?([a-z_]+)=(\w[\w.:-]*)", span):
            if key in GROUPS and not value.isupper() and value != "None":   # drafter=None is wrap's argument
                out.append((key, value))
    return sorted(set(out))


@pytest.mark.parametrize("group, name", inline_overrides())
def test_inline_config_names_exist(group, name):
    assert (CONF / group / f"{name}.yaml").is_file(), f"README's `{group}={name}`: no conf/{group}/{name}.yaml"


def test_stats_table_fields_exist():
    section = TEXT.split("### Statistics", 1)[1].split("\n### ", 1)[0]
    cells = [row.split("|")[1] for row in section.splitlines() if row.startswith("| `")]
    names = [n for cell in cells for n in re.findall(r"`(\w+)`", cell)]
    assert names, "the statistics table is gone"
    for n in names:
        assert has(SpecStats, n), f"SpecStats has no {n}"
    documented = set(names)
    missing = set(SpecStats.__dataclass_fields__) - documented
    assert not missing, f"SpecStats fields missing from the README's statistics table: {sorted(missing)}"


# ---------------------------------------------------------------- the drafter table
def drafter_rows() -> list[tuple[str, str, str, str]]:
    """(class cell, conf cell, lossless cell, CUDA-graph cell) of each row of the drafter table."""
    header = "| class | `conf/drafter/` | what it does | lossless | CUDA graphs |"
    assert header in TEXT, "the README's drafter table (or its header) is gone"
    rows = []
    for line in TEXT.split(header, 1)[1].splitlines()[2:]:   # after the |---| line
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"a drafter table row should have 5 cells: {line}"
        rows.append((cells[0], cells[1], cells[3], cells[4]))
    return rows


def drafter_calls(cell: str) -> list[ast.expr]:
    out = []
    for span in re.findall(r"`([^`]+)`", cell):
        try:
            out.append(ast.parse(span, mode="eval").body)
        except SyntaxError:   # e.g. `drafter=None`
            continue
    return out


def dotted(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else f"{dotted(node.value)}.{node.attr}"


def test_drafter_table_signatures():
    """Each class cell names something in specdec.drafters, with parameters it really takes."""
    rows = drafter_rows()
    assert len(rows) >= 10, "the drafter table is gone"
    for cell, *_ in rows:
        for node in drafter_calls(cell):
            func = node.func if isinstance(node, ast.Call) else node
            obj = resolve("specdec.drafters." + dotted(func))
            if not isinstance(node, ast.Call):
                continue
            params = inspect.signature(obj).parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
            named = [a.id for a in node.args if isinstance(a, ast.Name)] + [k.arg for k in node.keywords]
            for name in named:
                assert name in params or takes_any, f"{dotted(func)} takes no parameter {name!r} (README: {cell})"


def test_drafter_table_covers_every_drafter_and_config():
    rows = drafter_rows()
    classes = {dotted(n.func if isinstance(n, ast.Call) else n).split(".")[0]
               for cell, *_ in rows for n in drafter_calls(cell)}
    exported = {n for n in drafters.__all__ if isinstance(getattr(drafters, n), type)
                and issubclass(getattr(drafters, n), drafters.Drafter) and getattr(drafters, n) is not drafters.Drafter}
    exported |= {"TriForce"}   # a factory of Hierarchical drafters
    assert exported <= classes, f"drafters missing from the README table: {sorted(exported - classes)}"
    named = {n for _, conf, *_ in rows for n in re.findall(r"`(\w+)`", conf)}
    on_disk = {p.stem for p in (CONF / "drafter").glob("*.yaml")}
    assert named == on_disk, f"conf/drafter/ names: README has {sorted(named - on_disk)} extra, " \
                             f"misses {sorted(on_disk - named)}"
    assert all(lossless.startswith("yes") for _, _, lossless, _ in rows), "every drafter is verified by the target"


def built_drafters(model):
    """One instance of each drafter class, built on a tiny model, keyed by the README's class name."""
    import numpy as np

    from specdec.datastore import Datastore
    from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
    from specdec.drafters.kangaroo_adapter import KangarooAdapterModel
    from tiny import make_tiny

    d = drafters
    yield "NullDrafter", d.NullDrafter()
    yield "PromptLookup", d.PromptLookup()
    yield "DraftModel", d.DraftModel(make_tiny("llama", seed=1), num_tokens=2)
    yield "LayerSkip", d.LayerSkip(exit_layer=1)
    yield "LayerSkip.kangaroo", d.LayerSkip.kangaroo(exit_layer=1, num_tokens=3, stop_threshold=0.5)
    yield "Swift", d.Swift()
    yield "DynamicExit", d.DynamicExit(exit_layers=[1])
    yield "CopySpec", d.CopySpec()
    yield "RestDrafter", d.RestDrafter(Datastore.from_tokens(np.arange(4, 40, dtype=np.int32), vocab_size=256))
    yield "Rapid", d.Rapid()
    yield "SparseSelfDraft", d.SparseSelfDraft()
    yield "Hierarchical", d.TriForce()
    yield "EagleHead", d.EagleHead(EagleHeadModel.from_target(model, (0, 1, 1)), num_tokens=2)
    yield "MedusaHeads", d.MedusaHeads(MedusaHeadsModel.from_target(model, 2))
    yield "KangarooAdapter", d.KangarooAdapter(KangarooAdapterModel.from_target(model, 1), num_tokens=2)


def test_cuda_graph_column_matches_device_only():
    """"yes" exactly for the drafters whose spec (after binding to a target) is device-only."""
    from tiny import make_tiny

    column = {}
    for cell, _, _, graphs in drafter_rows():
        for node in drafter_calls(cell):
            name = dotted(node.func if isinstance(node, ast.Call) else node)
            column.setdefault(name, graphs)
            column.setdefault(name.split(".")[0], graphs)
    model = make_tiny("llama")
    for name, drafter in built_drafters(model):
        SpecDecoder(model, drafter=drafter, fuse=False)   # binds it
        claimed = column[name].split()[0].strip(",;")
        assert claimed in ("yes", "no"), f"{name}: CUDA-graph cell {column[name]!r} should start with yes or no"
        assert (claimed == "yes") == drafter.spec.device_only, \
            f"README: {name} in CUDA graphs {column[name]!r}, but its spec.device_only is {drafter.spec.device_only}"
    assert "no with `memory=True`" in column["CopySpec"] and not drafters.CopySpec(memory=True).spec.device_only


def test_host_bound_drafters_are_named_as_one_step_per_sync():
    """The README says the host-bound ones run through the same driver with n = 1."""
    section = TEXT.split("\n## Drafters", 1)[1].split("\n## ", 1)[0]
    assert "one step per host sync" in section and "n = 1" in section
    for name in ("Rapid", "RestDrafter", "Swift", "DynamicExit"):
        row = next(r for r in drafter_rows() if f"`{name}" in r[0])
        assert row[3].startswith("no"), name


# ---------------------------------------------------------------- measurements live in docs/RESULTS.md
MEASUREMENT = re.compile(r"\d+(?:\.\d+)?\s?(?:ms|µs|s|tok/s|tokens/s|steps/s)\b"   # times and speeds
                         r"|\d\.\d+\s?×|×\s?\d"                                  # ratios
                         r"|τ\s?[=≈]?\s?\d")                                       # acceptance lengths
PACKAGES = ("specdec", "drafters", "verifiers", "kernels", "training")


def measurements(text: str, echoes: bool = True) -> list[str]:
    """Lines of ``text`` quoting a speed, a time, a ratio or a τ. Worked examples are not
    measurements: arithmetic (``a / b``), and an output that echoes the example's own input
    (``f(0.83)  # "... (×0.83)"``: every number in the match appears on another line too)."""
    lines, out = text.splitlines(), []
    for i, ln in enumerate(lines):
        hits = [m.group(0) for m in MEASUREMENT.finditer(ln)]
        if not hits or " / " in ln:
            continue
        others = "\n".join(lines[:i] + lines[i + 1:])
        if echoes and all(n in others for h in hits for n in re.findall(r"\d+(?:\.\d+)?", h)):
            continue
        out.append(ln.strip())
    return out


def docstrings(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "name", path.name), doc


def test_no_measurements_in_readme_or_docstrings():
    for quoted in ("a step of 3.4 ms", "1.25× a plain step", "reached τ 2.25", "345 tok/s", "took 176 s"):
        assert measurements(quoted), quoted   # the pattern bites
    assert measurements("Example::\n\n    print(floor.ms)   # 0.09 ms on an H100")
    found = [f"README.md: {ln}" for ln in measurements(re.sub(r"```.*?```", "", TEXT, flags=re.S), echoes=False)]
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, doc in docstrings(path):
                found += [f"{path.relative_to(ROOT)} ({name}): {ln}" for ln in measurements(doc)]
    assert not found, "measurements belong in docs/RESULTS.md:\n" + "\n".join(found)
