"""``python -m plrd.deploy MEMBER_DIR --out DIR [--format onnx]``: export and validate.

The same arguments as the planned ``plrd export`` command; :func:`add_arguments` and
:func:`run` are what that command can call. Prints the export report (max |Δlogit| per prompt
with and without cache reuse, greedy agreement) and exits 1 with a one-line message on an
export or validation error.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export options, for ``python -m plrd.deploy`` and ``plrd export``."""
    parser.add_argument("member_dir", help="member directory (plrd.json) or HF model directory")
    parser.add_argument("--out", required=True, help="output directory (must be empty)")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="(default: onnx)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    parser.add_argument("--prompt", action="append", help="validation prompt (repeatable)")
    parser.add_argument("--new-tokens", type=int, default=20, help="greedy tokens compared")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="absolute |Δlogit|")
    parser.add_argument("--rtol", type=float, default=1e-5, help="plus rtol·max|logit|")
    parser.add_argument("--no-validate", action="store_true", help="skip the ORT validation")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    """Export as ``args`` say; print the report; 0 on success, 1 on a plrd.deploy error."""
    from plrd.deploy.errors import ExportError, ValidationError
    from plrd.deploy.onnx_export import export_onnx

    try:
        report = export_onnx(
            args.member_dir,
            args.out,
            opset=args.opset,
            validate_prompts=args.prompt,
            validate=not args.no_validate,
            max_new_tokens=args.new_tokens,
            tolerance=args.tolerance,
            rtol=args.rtol,
            threads=args.threads,
            overwrite=args.overwrite,
        )
    except ValidationError as error:
        print(error.report, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plrd.deploy", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
