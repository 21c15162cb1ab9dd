"""``python -m specdec.bench.collect MULTIRUN_DIR``: rebuild a sweep's summary.md and sweep.png.

A multirun collects itself when it ends; this re-collects one that was interrupted, or several
sweeps copied under one folder.
"""
import sys

from specdec.bench.report import collect


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m specdec.bench.collect MULTIRUN_DIR")
    runs = collect(args[0])
    print(f"collected {len(runs)} run(s) into {args[0]}/summary.md")


if __name__ == "__main__":
    main()
