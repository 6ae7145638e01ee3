"""The ``optimum-disc`` command: ``export``, ``evaluate`` and ``benchmark``.

Each subcommand lives in ``optimum_disc/commands/<name>.py`` and provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "export": "compile a Hugging Face checkpoint into a folder with the compiled artifact",
    "evaluate": "accuracy and speed of a compiled model over a labelled dataset",
    "benchmark": "latency of the compiled model against eager PyTorch and torch.compile",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-disc", description="Compile Hugging Face encoders to fused Triton kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"optimum_disc.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"optimum_disc.commands.{args.command}")
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
