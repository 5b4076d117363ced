"""`medclipsam` command line. Each command group lives in its own module here with a `register(subparsers)`
function; registering must stay cheap (no torch import) so `medclipsam --help` is instant."""

import argparse
import importlib
import sys

from .. import __version__
from ..errors import Cancelled, MedCLIPSAMError

# command-group modules, in the order they appear in --help
COMMAND_MODULES = [
    "demo",
    "segment",
    "segment_image",
    "serve",
    "models",
    "phantoms",
    "training",
    "medclipseg",
    "weak",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="medclipsam",
        description="Text-prompted medical image segmentation (MedCLIP-SAM, MedCLIP-SAMv2, MedCLIPSeg).",
    )
    parser.add_argument("--version", action="version", version=f"medclipsam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output, tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..runtime import prepare_openmp, setup_logging

    prepare_openmp()   # before anything imports torch
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except MedCLIPSAMError as exc:
        if args.verbose:
            raise
        print(f"medclipsam: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("medclipsam: cancelled; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line, details with --verbose
        if args.verbose:
            raise
        print(f"medclipsam: error: unexpected failure ({type(exc).__name__}: {exc}); run again with -v for details",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
