# Every CUDA test, in four groups side by side on one GPU (tiny models: no staging, no wheels).
# Source on the device machine from the repo root, after scripts/device_env.sh:
#   source scripts/gpu_tests.sh "$OUT" [SECONDS]      # logs OUT/g1..g4.log, cut at SECONDS (default 300)
out=${1:?usage: source scripts/gpu_tests.sh OUT [SECONDS]}
limit=${2:-300}
root=$PWD
t=tests
pytest_="timeout $limit python3 -P -m pytest -v -p no:cacheprovider -p no:logging -W ignore --rootdir $root"
(cd /tmp && $pytest_ $root/$t/test_gpu.py > "$out/g1_gpu.log" 2>&1) &
(cd /tmp && $pytest_ -k "cuda" $root/$t/test_kernels.py $root/$t/test_head_ops.py > "$out/g2_kernels_heads.log" 2>&1) &
(cd /tmp && $pytest_ $root/$t/test_processors.py::test_processors_inside_captured_graphs \
   $root/$t/test_eagle_tree.py::test_tree_inside_captured_steps_equals_hf \
   "$root/$t/test_sparse_kv.py::test_many_steps_per_sync_equal_hf[cuda]" \
   $root/$t/test_validate.py::test_captured_sampling_raises_for_invalid_logits_only_where_reached \
   $root/$t/test_validate.py::test_captured_steps_refuse_a_malformed_tree \
   $root/$t/test_readme_drafter.py::test_runs_inside_cuda_graphs \
   $root/$t/test_bench_core.py::test_on_cuda_the_first_call_captures_and_timed_calls_never_do \
   > "$out/g3_captured.log" 2>&1) &
(cd /tmp && $pytest_ $root/$t/test_memory.py::test_cuda_measured_extra_stays_under_several_budgets \
   > "$out/g4_memory.log" 2>&1) &
wait
grep -h -E "passed|failed|error" "$out"/g?_*.log | grep -E "^=+ " || true
