"""Generates the Python stubs for protos/ into meshgate/ (see `make protos`).

The stubs are committed so that `pip install` needs no code generator; a test
regenerates them and fails if the committed ones are stale.
"""

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out_dir: pathlib.Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *sources,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    for package_dir in {p.parent for p in out_dir.joinpath("meshgate").rglob("*_pb2.py")}:
        # Packages, so that `import meshgate.router.v1` works without namespace magic.
        node = package_dir
        while node != out_dir:
            (node / "__init__.py").touch(exist_ok=True)
            node = node.parent


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
