# Trains the shipped SmolLM2 draft heads on one GPU (the zoo's -eagle and -medusa entries):
# a recipe for a device machine that has torch, transformers, accelerate and peft, with the
# wheels of datasets, hydra-core and omegaconf carried in .whl/ (see docs/RESULTS.md).
#   source scripts/gpu_train_heads.sh eagle OUTDIR [extra Hydra overrides]
method=$1 out=$2; shift 2
[ -d /tmp/site/hydra ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/.whl/he WANDB_MODE=offline
source scripts/device_env.sh
(cd /tmp && python3 -c "import sys; from specdec.cli import train_main; sys.argv[0] = 'specdec-train'; train_main()" \
    +experiment=${method}_smollm2_gpu output_dir="$out" "$@")
