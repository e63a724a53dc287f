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

# The folder of each package: setuptools installs from it, and Cython is shown it under the package's name.
PACKAGE_DIR = {
    "loyalty.core": "core",
    "loyalty.server": "server",
    "loyalty.server.demo": "server/demo",
    "loyalty.server.processing": "server/processing",
    "loyalty.server.segments": "server/segments",
    "loyalty.server.scenarios": "server/scenarios",
    "loyalty.server.security": "server/security",
    "loyalty.clients": "clients",
    "loyalty.cli": "cli",
    "loyalty.v1": "proto/loyalty/v1",
}


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
    generate_client_methods(protos, include)


def generate_client_methods(protos, include: pathlib.Path) -> None:
    """The clients' typed methods (clients/_typed.py) from the protos' descriptors and comments
    (clients/codegen.py says why they are generated)."""
    import importlib.util
    import tempfile

    from grpc_tools import protoc

    spec = importlib.util.spec_from_file_location("loyalty_client_codegen", ROOT / "clients" / "codegen.py")
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "loyalty.desc"
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--descriptor_set_out={out}",
                "--include_imports", "--include_source_info", *map(str, protos)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed writing the descriptor set")
        codegen.write_module(out.read_bytes(), ROOT / "clients" / "_typed.py")


class BuildPy(build_py):
    def run(self):
        generate_protos()
        super().run()


class Develop(develop):
    def run(self):
        generate_protos()
        super().run()


def cython_include_dir(packages) -> pathlib.Path:
    """A folder in which each of ``packages`` sits at its module path, for Cython's include path.

    Cython finds a module's own .pxd by the module's full name: ``loyalty.core._engine`` reads
    ``loyalty/core/_engine.pxd`` from its include path, not the .pxd beside a .pyx whose folder is named
    otherwise (cython/cython#2452). package_dir keeps ``loyalty.core`` in core/, so build/cython/loyalty/core
    is made a link to core/: the one copy of the declarations, never a stale one.
    """
    base = ROOT / "build" / "cython"
    for package in packages:
        link = base.joinpath(*package.split("."))
        target = ROOT / PACKAGE_DIR[package]
        if link.is_symlink() and link.resolve() == target:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    return base


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
    modules = [ext, wire]
    include = cython_include_dir({m.name.rpartition(".")[0] for m in modules})
    return cythonize(modules, compiler_directives=directives, include_path=[str(include)], quiet=True)


generate_protos()

setup(
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={
        "loyalty.core": ["*.pxd", "*.pxi", "*.pyi", "py.typed"],
        "loyalty.server": ["*.pyi", "migrations/*.py", "migrations/*.mako", "migrations/versions/*.py"],
        "loyalty.server.demo": ["*.yaml", "*.json"],
        "loyalty.server.scenarios": ["examples/*.yaml"],
        "loyalty.clients": ["py.typed"],
        "loyalty.v1": ["*.proto", "*.pyi", "py.typed"],
    },
    ext_modules=extensions(),
    cmdclass={"build_py": BuildPy, "develop": Develop},
    zip_safe=False,
)
