"""``python -m specdec.bench ...`` is ``specdec-bench ...``; ``python -m specdec.bench.collect DIR`` re-collects."""
from specdec.bench.run import hydra_main

hydra_main()
