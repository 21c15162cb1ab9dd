# Source on the device machine from the repo root: makes `import specdec.*` work without pip
# (the five code folders are mapped into one package, as pyproject's package-dir does).
mkdir -p /tmp/pkg/specdec
for f in specdec/*; do ln -sfn "$PWD/$f" /tmp/pkg/specdec/; done
for d in drafters verifiers kernels training conf; do ln -sfn "$PWD/$d" "/tmp/pkg/specdec/$d"; done
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
