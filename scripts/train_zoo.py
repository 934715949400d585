"""Trains the labelled zoo (dsg_ext/models/zoo.py) on Fashion-MNIST on the CPU, each network in minutes,
and caches the weights by the hash of their recipe (``$DSG_ZOO_DIR``, default ~/.cache/dsg_ext/zoo).

    python scripts/train_zoo.py [NAME ...]     # default: every zoo network not trained yet

Prints one JSON line per network: its weights file, test top-1 and training seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dsg_ext.models import zoo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"zoo networks (default: all of {', '.join(zoo.ZOO)})")
    parser.add_argument("--retrain", action="store_true", help="train even if cached weights exist")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in zoo.ZOO]
    if unknown:
        print(f"train_zoo: unknown networks {unknown}; the zoo has {', '.join(zoo.ZOO)}", file=sys.stderr)
        return 2
    for name in args.names or list(zoo.ZOO):
        record = zoo.trained_metadata(name)
        if record is None or args.retrain:
            model, record = zoo.train(name, log=lambda line: print(line, file=sys.stderr, flush=True))
            zoo.save(name, model, record)
        print(json.dumps({"name": name, "weights": zoo.weights_path(name), **record,
                          "threads": torch.get_num_threads()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
