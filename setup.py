"""Generates the gRPC stubs from protos/ at build time (they are never committed).

They are written to tandem/v1/ (git-ignored) before setuptools looks for
packages, so `pip install .` puts them in the wheel and `pip install -e .`
maps them like any other package. Metadata lives in pyproject.toml.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def generate_stubs(out_dir: Path = ROOT) -> None:
    import grpc_tools
    from grpc_tools import protoc
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(map(str, protos)))
    for pkg in {p.parent.relative_to(ROOT / "protos") for p in protos}:
        for d in [pkg, *pkg.parents][:-1]:
            (out_dir / d / "__init__.py").touch()


generate_stubs()
setup()
