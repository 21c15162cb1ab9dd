"""Draft heads shipped inside the package (specdec/data/heads/<name>/), reached by zoo name.

- `zoo:<head>` resolves through the installed package (importlib.resources), the folder holds
  safetensors and JSON only, and a wheel built from pyproject carries it.
- A missing head, a head of another kind, or a head used with another target fails naming the
  problem and the fix (the build command, the right class, the verifier on record).
- The GPU-trained EAGLE head on `zoo:smollm2-135m-instruct` (fp32): greedy output equals HF greedy
  `generate` token for token, chain and tree, at batch 1 and ragged batch 2, and its τ on built-in
  prompts is well above 1.5 while an untrained head of the same shape stays near 1.
- The Medusa and Kangaroo heads, once their folders are shipped, load and decode exactly.
"""
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import make_tiny

import specdec
from specdec import zoo
from specdec.bench.prompts import builtin
from specdec.drafters import EagleHead, KangarooAdapter, MedusaHeads
from specdec.drafters.heads import (EagleHeadModel, HeadCheckpointError, VerifierMismatchError, check_verifier,
                                    model_identity)

ROOT = Path(__file__).resolve().parents[1]
EAGLE = "zoo:smollm2-135m-instruct-eagle"
LOADERS = {"eagle3": EagleHead, "medusa": MedusaHeads, "kangaroo": KangarooAdapter}
TREE = dict(tree_topk=4, tree_depth=4, tree_nodes=16)
# Built-in prompts (question ids) short enough for CPU tests; 29 and 35 are math, 14 editing.
PROMPT_IDS = (29, 35, 14)


def shipped(name: str) -> Path:
    """The shipped folder of zoo head ``name``, or skip while the lead has not dropped it in."""
    try:
        return zoo.head_dir(name)
    except zoo.ZooHeadMissing as err:
        pytest.skip(str(err))


# ---- files and packaging ----------------------------------------------------------------------
def test_zoo_names_resolve_through_the_package():
    """Every registered SmolLM2 head lives under the installed package's data/heads/<name>/."""
    package = Path(str(resources.files("specdec"))) / "data" / "heads"
    assert {f"smollm2-135m-instruct-{m}" for m in ("eagle", "medusa", "kangaroo")} <= set(zoo.head_names())
    for name in zoo.head_names():
        assert zoo.head_dir_path(f"zoo:{name}") == package / name
    folder = zoo.head_dir(EAGLE)
    assert folder == package / "smollm2-135m-instruct-eagle"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # nothing to unpickle


def test_shipped_eagle_folder_is_a_bf16_speculators_checkpoint():
    folder = zoo.head_dir(EAGLE)
    config = json.loads((folder / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert model_identity(config["speculators_config"]["verifier"]["name_or_path"]) == "zoo:smollm2-135m-instruct"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        floats = {f.get_tensor(k).dtype for k in names if f.get_tensor(k).is_floating_point()}
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= names
    assert "embed_tokens.weight" not in names and floats == {torch.bfloat16}
    assert (folder / "model.safetensors").stat().st_size < 25 << 20


def test_pyproject_ships_the_heads_in_a_wheel(tmp_path):
    """pyproject's package-data lists data/heads/**, and a wheel built from it holds the head files."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "data/heads/**" in meta["tool"]["setuptools"]["package-data"]["specdec"]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in meta["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = "from setuptools import build_meta; print(build_meta.build_wheel(%r))" % str(tmp_path / "dist")
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in zoo.head_dir(EAGLE).iterdir():
        assert f"specdec/data/heads/smollm2-135m-instruct-eagle/{path.name}" in names


# ---- clear errors ---------------------------------------------------------------------------
def test_missing_head_names_its_folder_and_build_command(monkeypatch):
    entry = zoo.HeadEntry(name="smollm2-135m-instruct-absent", kind="medusa", target="smollm2-135m-instruct",
                          method="medusa", experiment="medusa_smollm2_gpu")
    monkeypatch.setitem(zoo.HEADS, entry.name, entry)
    with pytest.raises(zoo.ZooHeadMissing) as err:
        MedusaHeads.from_pretrained("zoo:smollm2-135m-instruct-absent")
    message = str(err.value)
    assert str(zoo.head_dir_path(entry.name)) in message
    assert "gpu_train_heads.sh medusa OUTDIR" in message and "specdec-train +experiment=medusa_smollm2_gpu" in message


def test_unknown_and_wrong_kind_heads_are_refused_by_name():
    with pytest.raises(zoo.UnknownZooModel, match="known zoo heads: .*smollm2-135m-instruct-eagle"):
        EagleHead.from_pretrained("zoo:smollm2-135m-instruct")  # a model, not a head
    with pytest.raises(HeadCheckpointError, match="load it with EagleHead.from_pretrained"):
        MedusaHeads.from_pretrained(EAGLE)
    with pytest.raises(HeadCheckpointError, match="load it with EagleHead.from_pretrained"):
        KangarooAdapter.from_pretrained(EAGLE)


def test_verifier_identity_and_mismatch():
    """A zoo model's dense cache folder is its zoo name on any machine; other targets are refused."""
    assert model_identity("/root/.cache/specdec/zoo/smollm2-135m-instruct/dense") == "zoo:smollm2-135m-instruct"
    assert model_identity("/home/u/.cache/specdec/zoo/smollm2-135m-instruct/dense/") == "zoo:smollm2-135m-instruct"
    assert model_identity("") is None and model_identity("org/model") == "org/model"
    verifier = {"name_or_path": "/root/.cache/specdec/zoo/smollm2-135m-instruct/dense",
                "architectures": ["LlamaForCausalLM"]}
    target = make_tiny("llama").config
    check_verifier("EagleHead", verifier, target)  # a random-init target records no name: nothing to compare
    target._name_or_path, target.architectures = "/x/zoo/smollm2-135m-instruct/dense", ["LlamaForCausalLM"]
    check_verifier("EagleHead", verifier, target)
    target._name_or_path = "zoo:qwen2.5-coder-0.5b-instruct"
    with pytest.raises(VerifierMismatchError, match="trained on zoo:smollm2-135m-instruct .* target is "
                                                    "zoo:qwen2.5-coder-0.5b-instruct"):
        check_verifier("EagleHead", verifier, target)
    target._name_or_path, target.architectures = "", ["Qwen2ForCausalLM"]
    with pytest.raises(VerifierMismatchError, match="LlamaForCausalLM"):
        check_verifier("EagleHead", verifier, target)


def test_shipped_head_refuses_another_target_at_wrap():
    """The SmolLM2 head with another (named) target fails at wrap on the verifier, before any shape check."""
    other = make_tiny("llama")
    other.config._name_or_path, other.config.architectures = "someone/other-llama", ["LlamaForCausalLM"]
    with pytest.raises(VerifierMismatchError, match="someone/other-llama"):
        specdec.wrap(other, drafter=EagleHead.from_pretrained(EAGLE))


# ---- the trained EAGLE head on SmolLM2 ------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_eagle():
    """The shipped head in fp32, borrowing the target's embedding at bind."""
    head = EagleHeadModel.from_pretrained(EAGLE)
    assert head.borrows_embedding
    return head


def chat(tok, ids):
    prompts = {p.question_id: p for p in builtin()}
    texts = [tok.apply_chat_template([{"role": "user", "content": prompts[i].turns[0]}], add_generation_prompt=True,
                                     tokenize=False) for i in ids]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    assert len(set(enc.attention_mask.sum(1).tolist())) == len(ids), "prompts of different lengths"
    return enc


def greedy_kwargs(tok, enc, n=24) -> dict:
    return dict(attention_mask=enc.attention_mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)


def decode(model, tok, drafter, enc, n=24):
    """(HF greedy sequences, the engine's output with ``drafter``)."""
    kw = greedy_kwargs(tok, enc, n)
    ref = model.generate(enc.input_ids, **kw)
    out = specdec.wrap(model, drafter=drafter).generate(enc.input_ids, return_dict_in_generate=True, **kw)
    return ref, out


def test_drafter_eagle_config_defaults_to_the_shipped_head(smollm2):
    """`drafter=eagle` with no folder builds the shipped head; wrap binds it to SmolLM2 (the
    verifier on record matches) and fills its left-out embedding with the target's."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from specdec.drafters import build_drafter

    model, _ = smollm2
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("generate", overrides=["drafter=eagle", "model.device=cpu"])
    assert cfg.drafter.folder == EAGLE
    drafter = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), target=model)
    assert isinstance(drafter, EagleHead) and drafter.head.borrows_embedding
    specdec.wrap(model, drafter=drafter)
    assert torch.equal(drafter.head.embed_tokens.weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_shipped_eagle_equals_hf_greedy_at_batch_1(smollm2, shipped_eagle, shape):
    """Token-identical to HF greedy, and the trained head keeps more than 1.5 tokens per step."""
    model, tok = smollm2
    drafter = EagleHead(shipped_eagle, num_tokens=4, **(TREE if shape == "tree" else {}))
    ref, out = decode(model, tok, drafter, chat(tok, PROMPT_IDS[:1]))
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.tau > 1.5, out.spec_stats


def test_trained_head_beats_an_untrained_one(smollm2, shipped_eagle):
    """On a second built-in prompt: trained τ > 1.5, while a random-init head of the same shape
    (same aux layers and draft vocabulary) stays near 1; both exact."""
    model, tok = smollm2
    enc = chat(tok, PROMPT_IDS[1:2])
    untrained = EagleHeadModel.from_target(model, shipped_eagle.aux_layers, shipped_eagle.to_target(
        torch.arange(shipped_eagle.draft_vocab_size)))
    kw = greedy_kwargs(tok, enc, n=16)
    ref, taus = model.generate(enc.input_ids, **kw), {}
    for name, head in (("trained", shipped_eagle), ("untrained", untrained)):
        out = specdec.wrap(model, drafter=EagleHead(head, num_tokens=4)).generate(
            enc.input_ids, return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), name
        taus[name] = out.spec_stats.tau
    assert taus["trained"] > 1.5 and taus["untrained"] < 1.2 and taus["trained"] > taus["untrained"] + 0.4, taus


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_shipped_eagle_equals_hf_greedy_at_ragged_batch_2(smollm2, shipped_eagle, shape):
    model, tok = smollm2
    drafter = EagleHead(shipped_eagle, num_tokens=4, **(TREE if shape == "tree" else {}))
    ref, out = decode(model, tok, drafter, chat(tok, PROMPT_IDS[1:]))
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.tau > 1.5, out.spec_stats


@pytest.mark.slow
@pytest.mark.parametrize("method", ["medusa", "kangaroo"])
def test_other_shipped_heads_load_and_stay_exact(smollm2, method):
    """Skips until the folder is shipped; then: safetensors only, trained on SmolLM2, exact at batch 1."""
    name = f"zoo:smollm2-135m-instruct-{method}"
    folder = shipped(name)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert model_identity(config["speculators_config"]["verifier"]["name_or_path"]) == "zoo:smollm2-135m-instruct"
    model, tok = smollm2
    ref, out = decode(model, tok, LOADERS[zoo.get_head(name).kind].from_pretrained(name), chat(tok, PROMPT_IDS[:1]))
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.tau > 1.2, out.spec_stats
