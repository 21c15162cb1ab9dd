"""Turn a model spec into a dense `(model, tokenizer)` pair.

A spec is one of:
  * an HF hub id or a local folder: plain `from_pretrained` of the model and its tokenizer;
  * a path ending in `.gguf`: transformers dequantises every tensor to a dense float weight
    (no packed quantised matmuls), and the tokenizer is completed from the file's metadata;
  * `zoo:NAME`: a model of `specdec.zoo`. Its GGUF is dequantised once, checked, and saved as
    a dense float32 safetensors folder in the zoo cache; every load after that reads the folder
    and needs neither the `gguf` package nor the zoo packages.

What "completed" means for a GGUF tokenizer: transformers' conversion may drop the chat
template or guess the special tokens wrong (5.17 makes SmolLM2's eos `<|im_start|>`), so the
template and the bos/eos/unk/pad tokens are set from the file's own `tokenizer.*` keys, and
`generation_config.eos_token_id` lists every end-of-turn id (the file's eos and eot ids plus
the zoo entry's stop tokens).

This module knows transformers' loading API and the GGUF header format. It knows nothing about
decoding; the engine receives the model and tokenizer as they are returned here.

Example:
    >>> model, tok = load_model("zoo:smollm2-135m-instruct")          # doctest: +SKIP
    >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
    ...                               return_tensors="pt", return_dict=True)["input_ids"]  # doctest: +SKIP
    >>> model(ids).logits.shape  # [B, T, vocab]                       # doctest: +SKIP
    torch.Size([1, 31, 49152])
"""
from __future__ import annotations

import gc
import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from specdec import zoo

__all__ = ["load_model", "load_gguf", "dense_zoo_dir", "resolve_dtype", "read_gguf_metadata"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_DENSE_MARKER = zoo.DENSE_MANIFEST


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """Normalise a dtype argument: a torch float dtype, or the string "auto".

    None means float32. "auto" means the checkpoint's own dtype (float32 for GGUF and zoo
    models, which are dequantised to float32).

    Example:
        >>> resolve_dtype("bf16"), resolve_dtype(None), resolve_dtype("torch.float16")
        (torch.bfloat16, torch.float32, torch.float16)
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype, 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def load_model(spec: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None):
    """Load a causal LM and its tokenizer from an HF id/folder, a `.gguf` path or `zoo:NAME`.

    Args:
        spec: `"zoo:smollm2-135m-instruct"`, `"/tmp/stage/model.gguf"`, `"./my-model"` or a hub id.
        dtype: torch dtype or one of "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16",
            "auto". None loads float32.
        device: where to put the model ("cpu", "cuda", "cuda:1", a torch.device); None leaves
            it on the CPU.

    Returns:
        (model, tokenizer): the model in eval mode with dense floating point weights.

    Example:
        >>> model, tok = load_model("zoo:qwen2.5-coder-0.5b-instruct", dtype="bf16", device="cuda")  # doctest: +SKIP
        >>> model.dtype, model.device.type, model.training                                         # doctest: +SKIP
        (torch.bfloat16, 'cuda', False)
    """
    dtype = resolve_dtype(dtype)
    text = os.fspath(spec)
    if text.startswith("zoo:"):
        folder = dense_zoo_dir(text)
        model, tokenizer = _from_folder(folder, torch.float32 if dtype == "auto" else dtype)
    elif text.lower().endswith(".gguf"):
        model, tokenizer = load_gguf(text, dtype=dtype)
    else:
        model, tokenizer = _from_folder(text, dtype)
    if device is not None:
        model = model.to(torch.device(device))
    return model.eval(), tokenizer


def _from_folder(name_or_path: str | os.PathLike, dtype):
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model, tokenizer


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
              stop_tokens: tuple[str, ...] = ()):
    """Dequantise a GGUF file into a dense HF model, and build its completed tokenizer.

    Needs the `gguf` package. Every quantised tensor becomes a dense `dtype` weight (float32
    by default; "auto" also means float32); no module keeps packed blocks. `stop_tokens` are
    extra end-of-turn tokens for `generation_config.eos_token_id`.

    Example:
        >>> model, tok = load_gguf("/tmp/stage/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")  # doctest: +SKIP
        >>> tok.chat_template is not None, model.generation_config.eos_token_id           # doctest: +SKIP
        (True, [151645, 151643])
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        import gguf  # noqa: F401  (transformers dequantises with it)
    except ImportError as err:
        raise ImportError(f"loading {path.name} needs the `gguf` package: pip install 'gguf>=0.10'") from err
    dtype = resolve_dtype(dtype)
    dtype = torch.float32 if dtype == "auto" else dtype
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True))
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")
                     or any(not p.is_floating_point() for p in m.parameters(recurse=False))})
    if packed:
        raise RuntimeError(f"{path.name}: transformers kept packed weights in {packed}; specdec needs dense ones")
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the weights are plain floats now
    _complete_from_metadata(model, tokenizer, read_gguf_metadata(path), stop_tokens)
    return model.eval(), tokenizer


def _complete_from_metadata(model, tokenizer, meta: dict, stop_tokens: tuple[str, ...]) -> None:
    """Set chat template, special tokens and generation ids from the GGUF's `tokenizer.*` keys."""
    if not tokenizer.chat_template and meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    vocab = len(tokenizer)
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < vocab:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False  # BPE: cleanup would delete real spaces

    eos = [tokenizer.eos_token_id]
    eos += [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
    eos += [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens if t in tokenizer.get_vocab()]
    eos = list(dict.fromkeys(i for i in eos if isinstance(i, int) and 0 <= i < vocab))
    if tokenizer.pad_token is None and eos:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos[0])
    gen = model.generation_config
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen._from_model_config = False  # ours, not derived from config.json: keep it on reload
    model.config.pad_token_id = tokenizer.pad_token_id


def dense_zoo_dir(name: str) -> Path:
    """The dense float32 safetensors folder of a zoo model, built from its GGUF on first use, and
    checked on every use.

    Building it takes the GGUF (assembled and checked by `zoo.gguf_path`), dequantises it, and
    writes model, tokenizer and generation config to a temporary folder that is renamed into
    place with a manifest last, so an interrupted build is redone, never half-read.
    Layout: `<zoo.model_dir(name)>/dense/` with `config.json`, `model.safetensors`,
    `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`
    and `specdec-dense.json` (the GGUF's sha256, the transformers version used, and every other
    file's size and sha256). Each use checks the files against it (`zoo.check_file`: a stat, or a
    full hash for a file that changed); a damaged file raises `zoo.ZooChecksumError` naming it,
    the folder and the command that rebuilds it.

    Example:
        >>> dense_zoo_dir("zoo:smollm2-135m-instruct")  # doctest: +SKIP
        PosixPath('/root/.cache/specdec/zoo/smollm2-135m-instruct/dense')
    """
    entry = zoo.get(name)
    target = zoo.model_dir(entry.name) / "dense"
    if _dense_is_current(target, entry):
        _check_dense(entry, target)
        return target
    model, tokenizer = load_gguf(zoo.gguf_path(entry.name), dtype=torch.float32, stop_tokens=entry.stop_tokens)
    tmp = Path(tempfile.mkdtemp(prefix=".dense.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        gc.collect()
        files = {p.name: {"size": p.stat().st_size, "sha256": zoo.sha256_file(p)} for p in sorted(tmp.iterdir())}
        _write_manifest(tmp, entry, files)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        if _dense_is_current(target, entry):  # another process finished first: keep theirs
            shutil.rmtree(tmp)
            _check_dense(entry, target)
            return target
        if target.exists():  # stale: built from another GGUF
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for rel, meta in files.items():
        zoo.stamp(entry.name, target / rel, meta["sha256"])
    return target


def _write_manifest(folder: Path, entry: zoo.ZooEntry, files: dict) -> None:
    manifest = {"zoo": entry.name, "gguf_sha256": entry.sha256, "transformers": transformers.__version__,
                "files": files}
    fd, tmp = tempfile.mkstemp(prefix=f".{_DENSE_MARKER}.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / _DENSE_MARKER)


def _dense_is_current(folder: Path, entry: zoo.ZooEntry) -> bool:
    """True if ``folder`` holds a finished build from this entry's GGUF (its files not yet checked)."""
    try:
        marker = json.loads((folder / _DENSE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("gguf_sha256") == entry.sha256


def _check_dense(entry: zoo.ZooEntry, folder: Path) -> None:
    """Raise ZooChecksumError unless every file of the manifest is the one the build wrote."""
    try:
        files = zoo.dense_manifest(folder)
    except zoo.ZooChecksumError:  # built before manifests listed files: checked once, then listed
        files = _adopt_legacy(entry, folder)
    for rel, meta in sorted(files.items()):
        if bad := zoo.check_file(entry.name, folder / rel, meta["size"], meta["sha256"]):
            raise zoo.ZooChecksumError(
                f"zoo model {entry.name!r}: the dense cache folder {folder} is damaged: {rel}: {bad}. "
                f"Rebuild it with: {zoo.rebuild_command(entry.name)}")


def _adopt_legacy(entry: zoo.ZooEntry, folder: Path) -> dict:
    """Record the files of a dense folder built before manifests listed them, after checking that
    every weight is finite (dequantised weights always are)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                bad = [k for k in f.keys() if not torch.isfinite(f.get_tensor(k)).all()]
        except Exception as err:  # noqa: BLE001  (any unreadable file is damage)
            bad = [f"unreadable ({type(err).__name__}: {err})"]
        if bad:
            raise zoo.ZooChecksumError(
                f"zoo model {entry.name!r}: the dense cache folder {folder} is damaged: {path.name}: "
                f"non-finite or unreadable tensors {bad[:3]}. Rebuild it with: {zoo.rebuild_command(entry.name)}")
    files = {p.name: {"size": p.stat().st_size, "sha256": zoo.sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != _DENSE_MARKER}
    _write_manifest(folder, entry, files)
    for rel, meta in files.items():
        zoo.stamp(entry.name, folder / rel, meta["sha256"])
    return files


# GGUF value type id -> struct format, for the fixed-size scalar types (gguf spec, v2/v3).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """The scalar and string key/values of a GGUF header; arrays (the vocab, merges) are skipped.

    Reads only the header, so it takes milliseconds where `gguf.GGUFReader` takes seconds on a
    150k-token vocabulary.

    Example:
        >>> meta = read_gguf_metadata(zoo.gguf_path("smollm2-135m-instruct"))  # doctest: +SKIP
        >>> meta["general.architecture"], meta["tokenizer.ggml.eos_token_id"]  # doctest: +SKIP
        ('llama', 2)
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, _tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        pos, meta = 24, {}

        def string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", buf, at)
            return buf[at + 8:at + 8 + length].decode("utf-8", errors="replace"), at + 8 + length

        def skip(at: int, vtype: int) -> int:
            if vtype in _GGUF_SCALARS:
                return at + struct.calcsize(_GGUF_SCALARS[vtype])
            if vtype == _GGUF_STRING:
                return at + 8 + struct.unpack_from("<Q", buf, at)[0]
            etype, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if etype in _GGUF_SCALARS:
                return at + count * struct.calcsize(_GGUF_SCALARS[etype])
            for _ in range(count):
                at = skip(at, etype)
            return at

        for _ in range(kv_count):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if vtype in _GGUF_SCALARS:
                (meta[key],) = struct.unpack_from(_GGUF_SCALARS[vtype], buf, pos)
            elif vtype == _GGUF_STRING:
                meta[key], _ = string(pos)
            elif vtype != _GGUF_ARRAY:
                raise ValueError(f"{path}: unknown GGUF value type {vtype} for key {key!r}")
            pos = skip(pos, vtype)
    return meta
