# Long-context drafting (issue 18), all through the one harness (python -m specdec.bench): the
# full-context baseline, prompt lookup, the sparse-KV self-draft, TriForce (lookup over the sparse
# self-draft) and RAPID on haystack and needle prompts of each length (bf16, greedy), then RAPID
# under several memory budgets at the longest length, then the checks (specdec.bench.long_check:
# outputs equal the baseline's or part at a near-tie, needles found, peak extra memory under each
# budget). Rows carry tok/s, τ and peak memory (peak_bytes, peak_extra_bytes). RAPID needs the host
# every step, so the engine refuses it CUDA graphs: it runs compiled, beside a baseline of its own.
# Source on the device machine from the repo root, after scripts/device_env.sh:
#   source scripts/bench_long.sh "$OUT"                        # Qwen2.5-Coder 1.5B, 8K/16K/32K
#   ASSISTANT=zoo:qwen2.5-coder-0.5b-instruct source scripts/bench_long.sh "$OUT"   # + a TriForce with a draft-model top
# CPU smoke (one 2K prompt, a few tokens):
#   MODEL=zoo:smollm2-135m-instruct LENGTHS=2048 DEVICE=cpu DTYPE=float32 FAST= NEW=8 BUDGETS="8 16" \
#     source scripts/bench_long.sh /tmp/long
out=${1:?usage: source scripts/bench_long.sh OUT}
model=${MODEL:-zoo:qwen2.5-coder-1.5b-instruct}
lengths=$(echo ${LENGTHS:-8192 16384 32000} | tr ' ' ',')   # 32000 + the template + NEW fit 32768 positions
longest=${lengths##*,}
fast=${FAST---cuda-graphs --compile}
compile=$(echo "$fast" | grep -o -- "--compile")
new=${NEW:-128}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
plain="python3 -P -m specdec.bench --model $model --device $device --dtype $dtype --max-new-tokens $new --no-hf --quiet"
# One cache size for every call, so nothing compiles or captures again at a new prompt length.
bench="$plain --cache-len $((longest + new + 1024))"
prompts="--prompts long:lengths=[$lengths],per_length=${PER_LENGTH:-1},tokenizer=$model
  --prompts long:lengths=[$lengths],per_length=${PER_LENGTH:-1},tokenizer=$model,needle=true"
triforce="--drafter triforce:num_tokens=8,rounds=2"
[ -n "$ASSISTANT" ] && triforce="$triforce --drafter triforce:num_tokens=8,rounds=2,top={\"_target_\":\"specdec.drafters.DraftModel.from_pretrained\",\"spec\":\"$ASSISTANT\",\"num_tokens\":3,\"dtype\":\"$dtype\",\"device\":\"$device\"}"
$bench $fast $prompts --drafter none --drafter lookup:num_tokens=8 --drafter sparse_self:num_tokens=4 \
  $triforce --out "$out/graphs"
$bench $compile $prompts --drafter rapid:num_tokens=4,context_tokens=4096 --out "$out/rapid"
budgets=""
for mib in ${BUDGETS:-16 32 64 128}; do
  budgets="$budgets --drafter rapid:num_tokens=4,context_tokens=4096,memory_budget=$((mib << 20))"
done
# Budgets: eager and sized to the call (no --cache-len), and no warm-up, so each method's timed call
# is its first and allocates its caches inside the measured peak (peak_extra_bytes).
$plain --warmup 0 --prompts long:lengths=[$longest],per_length=1,tokenizer=$model $budgets --out "$out/budget"
python3 -P -m specdec.bench.long_check "$out/graphs" "$out/rapid" "$out/budget" --tokenizer $model \
  | tee "$out/long_check.md"
