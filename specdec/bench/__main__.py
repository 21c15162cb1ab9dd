"""``python -m specdec.bench ...``: the Hydra-free harness (``specdec.bench.command``);
``python -m specdec.bench.collect DIR`` re-collects a sweep's tables."""
from specdec.bench.command import main

main()
