"""Build: the Cython rules core and the gRPC stubs are made here, never committed.

Every folder installs under the one ``loyalty`` namespace (``core/`` is ``loyalty.core``, ``server/`` is
``loyalty.server``...), so a checkout never shadows the installed package and tests always exercise
what ``pip install .`` built. ``LOYALTY_DEBUG=1`` compiles the core with bounds checks and asserts.
"""
import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"
DEBUG = os.environ.get("LOYALTY_DEBUG") == "1"


def generate_protos() -> None:
    """Compile proto/loyalty/v1/*.proto into *_pb2.py, *_pb2.pyi and *_pb2_grpc.py beside them."""
    protos = sorted(PROTO_ROOT.glob("loyalty/v1/*.proto"))
    if not protos:
        return
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for proto in protos:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={PROTO_ROOT}",
            f"--pyi_out={PROTO_ROOT}",
            f"--grpc_python_out={PROTO_ROOT}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto.relative_to(ROOT)}")


class BuildPy(build_py):
    def run(self):
        generate_protos()
        super().run()


class Develop(develop):
    def run(self):
        generate_protos()
        super().run()


def extensions():
    from Cython.Build import cythonize

    macros = [("CYTHON_TRACE", "0")]
    if DEBUG:
        macros.append(("LOYALTY_DEBUG", "1"))
    ext = Extension(
        "loyalty.core._engine",
        ["core/_engine.pyx"],
        define_macros=macros,
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
    )
    directives = {
        "language_level": "3",
        "boundscheck": DEBUG,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": DEBUG,
        "embedsignature": True,
    }
    # The protobuf wire codec of the receipt messages, so CalculateReceipt need not build Python messages.
    wire = Extension(
        "loyalty.server._wire",
        ["server/_wire.pyx"],
        define_macros=macros,
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
    )
    return cythonize([ext, wire], compiler_directives=directives, quiet=True)


generate_protos()

setup(
    packages=[
        "loyalty.core",
        "loyalty.server",
        "loyalty.server.demo",
        "loyalty.server.processing",
        "loyalty.server.segments",
        "loyalty.server.scenarios",
        "loyalty.clients",
        "loyalty.cli",
        "loyalty.v1",
    ],
    package_dir={
        "loyalty.core": "core",
        "loyalty.server": "server",
        "loyalty.server.demo": "server/demo",
        "loyalty.server.processing": "server/processing",
        "loyalty.server.segments": "server/segments",
        "loyalty.server.scenarios": "server/scenarios",
        "loyalty.clients": "clients",
        "loyalty.cli": "cli",
        "loyalty.v1": "proto/loyalty/v1",
    },
    package_data={
        "loyalty.core": ["*.pxd", "*.pyi", "py.typed"],
        "loyalty.server": ["*.pyi", "migrations/*.py", "migrations/*.mako", "migrations/versions/*.py"],
        "loyalty.server.demo": ["*.yaml", "*.json"],
        "loyalty.server.scenarios": ["examples/*.yaml"],
        "loyalty.v1": ["*.proto", "*.pyi"],
    },
    ext_modules=extensions(),
    cmdclass={"build_py": BuildPy, "develop": Develop},
    zip_safe=False,
)
