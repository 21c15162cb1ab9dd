"""The bandwidth floor counts what a decode step must read: weights once, K/V of the context."""
from tiny import make_tiny

from specdec.perf import step_floor


def test_step_floor_counts_weights_and_kv():
    model = make_tiny("llama", vocab_size=256, hidden=64, num_layers=2)   # untied embeddings, fp32
    params = sum(p.numel() for p in model.parameters())
    embed = 256 * 64
    floor = step_floor(model, batch=2, context=100, bandwidth=1e9)
    kv = 2 * 2 * 2 * 100 * 2 * 16   # k and v, layers, rows, tokens, kv heads, head dim
    assert floor.bytes == 4 * (params - embed + 2 * 64 + kv)
    assert abs(floor.ms - 1e3 * floor.bytes / 1e9) < 1e-9
    assert step_floor(model).ms is None   # a CPU model: no known bandwidth


def test_step_floor_reads_a_tied_embedding_once():
    model = make_tiny("llama", tie_word_embeddings=True)
    params = sum(p.numel() for p in model.parameters())   # the tied matrix is listed once
    assert step_floor(model, batch=1, context=0).bytes == 4 * params
