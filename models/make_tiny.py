#!/usr/bin/env python3
"""Write a complete tiny random-weight weights bundle (official file formats) for tests and offline smoke runs.

    python models/make_tiny.py --out DIR [--seed N]

Point MODEL_DIR at DIR to serve it. Its answers are meaningless (random weights); the bundle says so in
README.txt and TINY_RANDOM_WEIGHTS.txt, and the service marks every result from it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.bundle import TINY_NOTICE, write_tiny_bundle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory to write the bundle into")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    args = parser.parse_args(argv)
    out = write_tiny_bundle(args.out, seed=args.seed)
    print(f"wrote a tiny bundle to {out}\n{TINY_NOTICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
