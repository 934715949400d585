"""``dsg info``: versions, and which backends this build has."""

from __future__ import annotations

import argparse
import platform


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions and which backends this build has")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import dsg_ext

    print(f"dsg_ext {dsg_ext.__version__}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), Python {platform.python_version()}")
    print(f"CPU ops: yes; CUDA ops built: {'yes' if dsg_ext.cuda_ops_built() else 'no'}; "
          f"GPU available: {'yes' if torch.cuda.is_available() else 'no'}")
    return 0
