"""Tiny random-init models of every supported architecture, built from configs (no hub)."""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def make_tiny(arch: str = "llama", vocab_size: int = 256, num_layers: int = 2, hidden: int = 64,
              seed: int = 0, init_range: float = 0.3, **overrides):
    """A deterministic tiny causal LM in fp32 on CPU.

    A large ``init_range`` makes the next-token distributions peaked, so greedy argmax has
    clear margins (no accidental fp32 near-ties) and the text repeats, which gives drafters
    something to accept.
    """
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=hidden // 4, max_position_embeddings=1024, initializer_range=init_range,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    kwargs.update(overrides)
    config = _CONFIGS[arch](**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def char_tokenizer():
    """A character-level fast tokenizer (73 tokens: <pad>=0, <s>=1, </s>=2, <unk>=3, then chars).

    Pair it with ``make_tiny(vocab_size=73)`` to test text-level features such as stop strings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?0123456789"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def hf_greedy(model, input_ids, attention_mask=None, **kwargs):
    """Plain HF greedy ``generate``: the reference every lossless path must equal."""
    kwargs.setdefault("pad_token_id", 0)
    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, **kwargs)


def ragged_batch(lengths, vocab_size, seed=0, pad=0):
    """Left-padded ``(input_ids, attention_mask)`` with rows of the given lengths (tokens >= 4)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = torch.randint(4, vocab_size, (n,), generator=g)
        mask[r, t - n:] = 1
    return ids, mask
