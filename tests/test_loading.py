"""`load_model`: every spec kind gives a dense eval-mode model and a usable tokenizer.

The invariant behind the zoo's dense cache: its logits equal transformers' own GGUF loading of
the same file, so caching changes load time and nothing else.
"""
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec import zoo
from specdec.loading import dense_zoo_dir, load_model, resolve_dtype
from tiny import make_tiny

SMOL = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 from the zoo's dense cache (built from the GGUF on the first run, ~30 s)."""
    return load_model(f"zoo:{SMOL}")


def chat_ids(tokenizer) -> torch.Tensor:
    """[1, T] prompt ids of CHAT under the tokenizer's chat template."""
    return tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()  # [B, T, vocab]


@pytest.mark.parametrize("arg, want", [
    (None, torch.float32), ("float32", torch.float32), ("fp32", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("fp16", torch.float16),
    ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16), ("auto", "auto"), ("AUTO", "auto"),
])
def test_resolve_dtype(arg, want):
    assert resolve_dtype(arg) == want


@pytest.mark.parametrize("bad", ["int8", "float8", torch.int64])
def test_resolve_dtype_rejects(bad):
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(bad)


def test_smollm2_is_dense_eval_llama(smol):
    model, _ = smol
    assert not model.training
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(type(m) is torch.nn.Linear for m in model.modules() if "Linear" in type(m).__name__)


def test_smollm2_tokenizer_has_chat_template_and_stops_at_im_end(smol):
    model, tok = smol
    assert tok.chat_template is not None
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>"
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert model.generation_config.pad_token_id is not None
    assert chat_ids(tok)[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")  # no extra bos
    assert tok.decode(tok(" def f(x):\n\treturn x ,")["input_ids"]) == " def f(x):\n\treturn x ,"


def test_smollm2_greedy_answer_ends_turn(smol):
    model, tok = smol
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_dtype_and_device_arguments(smol):
    model, _ = load_model(f"zoo:{SMOL}", dtype="bf16", device=torch.device("cpu"))
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu" and not model.training
    full = smol[0].state_dict()
    assert all(torch.equal(w, full[k].to(torch.bfloat16)) for k, w in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_local_folder_round_trip(tmp_path, smol, arch):
    # A saved model folder with a real tokenizer (SmolLM2's) loads back as the same model.
    original = make_tiny(arch, vocab_size=len(smol[1]))
    original.save_pretrained(tmp_path)
    smol[1].save_pretrained(tmp_path)

    model, tok = load_model(tmp_path, device="cpu")
    assert not model.training and model.dtype == torch.float32
    assert tok.chat_template == smol[1].chat_template
    if arch == "llama":  # transformers swaps in Qwen2Tokenizer etc. for other model types
        assert tok("def f(x): return x")["input_ids"] == smol[1]("def f(x): return x")["input_ids"]
    ids = chat_ids(smol[1])  # [1, T]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), atol=0, rtol=0)

    half, _ = load_model(str(tmp_path), dtype="float16")
    assert half.dtype == torch.float16 and not half.training
    full = original.state_dict()
    assert all(torch.equal(w, full[k].half()) for k, w in half.state_dict().items())


def test_missing_gguf_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(tmp_path / "absent.gguf")


@pytest.fixture(scope="module")
def reference():
    """SmolLM2 as transformers alone loads the GGUF: no specdec code involved."""
    path = zoo.gguf_path(SMOL)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_dense_cache_logits_match_transformers_gguf_load(smol, reference):
    model, tok = smol
    ids = chat_ids(tok)  # [1, T]
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-4, rtol=1e-4)
    theirs = reference.state_dict()
    assert all(torch.equal(w, theirs[k]) for k, w in model.state_dict().items())


@pytest.mark.slow
def test_gguf_path_load_from_anywhere(tmp_path, smol, reference):
    # A GGUF copied to an arbitrary path (as on the GPU machine) loads without the zoo.
    copy = tmp_path / "staged" / "model.gguf"
    copy.parent.mkdir()
    shutil.copyfile(zoo.gguf_path(SMOL), copy)
    model, tok = load_model(copy)
    assert not model.training and model.dtype == torch.float32
    assert tok.chat_template == smol[1].chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    ids = chat_ids(tok)
    assert torch.equal(ids, chat_ids(smol[1]))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_dense_dir_is_marked(smol):
    folder = dense_zoo_dir(SMOL)
    assert (folder / "specdec-dense.json").is_file()
    assert folder.parent == zoo.model_dir(SMOL)


@pytest.mark.slow
@pytest.mark.zoo
def test_qwen_half_b_dense_matches_transformers_gguf_load():
    name = "qwen2.5-coder-0.5b-instruct"
    if not zoo.is_available(name):
        pytest.skip(f"zoo model {name} not installed: {zoo.get(name).pip_command}")
    model, tok = load_model(f"zoo:{name}")
    assert tok.chat_template is not None and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == [151645, 151643]  # <|im_end|>, <|endoftext|>
    ids = chat_ids(tok)
    ours = logits(model, ids)
    del model
    path = zoo.gguf_path(name)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    torch.testing.assert_close(ours, logits(reference.eval(), ids), atol=1e-4, rtol=1e-4)
    # The cached folder's tokenizer (reloaded as Qwen2Tokenizer) splits text like the GGUF's.
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["def f(x):\n    return x ** 2  # square", "  héllo wörld 你好 12345", "<|im_start|>user\nhi"]:
        assert tok(text)["input_ids"] == theirs(text)["input_ids"]
