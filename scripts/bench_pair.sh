# Qwen2.5-Coder 0.5B -> 1.5B (chain and tree) and prompt lookup on the CPU in fp32, where every
# greedy output must equal the baseline's and HF's token for token; τ per drafter.
#   source scripts/bench_pair.sh OUT
draft=zoo:qwen2.5-coder-0.5b-instruct
python -m specdec.bench --model zoo:qwen2.5-coder-1.5b-instruct --device cpu --dtype float32 --threads 2 \
  --drafter draft_model:spec=$draft,num_tokens=4 --drafter draft_model:spec=$draft,num_tokens=4,tree_width=3,tree_nodes=16 \
  --drafter lookup:num_tokens=8 --categories coding --num-prompts 3 --max-new-tokens 64 --warmup 0 --out "${1:?OUT}/pair"
