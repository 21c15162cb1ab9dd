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
