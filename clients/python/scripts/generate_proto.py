#!/usr/bin/env python3
"""Regenerates the gRPC stubs in src/turnstile_client/_proto from the broker's API.

The stubs are checked in, so that `pip install ./clients/python` needs nothing but
PyPI's grpcio and protobuf wheels (no protoc, no path outside the package). Run this
after changing proto/proto/turnstile/v1/turnstile.proto, with the pinned generator:

    pip install -r clients/python/requirements-dev.txt
    python clients/python/scripts/generate_proto.py          # rewrite the stubs
    python clients/python/scripts/generate_proto.py --check  # fail if they are stale

The test suite runs the check, so a proto change without regenerated stubs fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
from pathlib import Path

# The generator is pinned: another grpcio-tools writes different gencode (and asks
# for a different protobuf runtime), which the --check would take for a stale stub.
GRPCIO_TOOLS_VERSION = "1.73.0"

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "turnstile_client" / "_proto"
PROTO_ROOT = HERE.parents[2] / "proto" / "proto"
PROTO = "turnstile/v1/turnstile.proto"
FILES = ("turnstile_pb2.py", "turnstile_pb2.pyi", "turnstile_pb2_grpc.py")

# protoc's gRPC plugin imports the messages by their proto path; inside the package
# they are a sibling module.
ABSOLUTE_IMPORT = "from turnstile.v1 import turnstile_pb2 as"
RELATIVE_IMPORT = "from . import turnstile_pb2 as"


def generate() -> dict[str, str]:
    """The stubs as protoc writes them today, with the package-relative import."""
    try:
        have = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(
            f"generate_proto: grpcio-tools is not installed; "
            f"pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        )
    if have != GRPCIO_TOOLS_VERSION:
        sys.exit(
            f"generate_proto: grpcio-tools {have} is installed, the stubs are made with "
            f"{GRPCIO_TOOLS_VERSION}; pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        )
    from grpc_tools import protoc  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            sys.exit(f"generate_proto: protoc failed on {PROTO_ROOT / PROTO}")
        gen = Path(out) / "turnstile" / "v1"
        files = {name: (gen / name).read_text() for name in FILES}
    grpc_stub = files["turnstile_pb2_grpc.py"]
    if ABSOLUTE_IMPORT not in grpc_stub:
        sys.exit("generate_proto: the gRPC stub no longer imports its messages as expected")
    files["turnstile_pb2_grpc.py"] = grpc_stub.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the checked-in stubs instead of writing them",
    )
    args = parser.parse_args()
    files = generate()
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (PACKAGE / name).is_file() or (PACKAGE / name).read_text() != text
        ]
        if stale:
            print(
                f"generate_proto: stale stubs in {PACKAGE}: {', '.join(stale)}; "
                f"run {Path(__file__).name} to regenerate them",
                file=sys.stderr,
            )
            return 1
        return 0
    for name, text in files.items():
        (PACKAGE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
