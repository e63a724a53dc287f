"""What the renovation of ``server/`` (issue 12) left, held by a test: every module of ``server/`` stays under
about 600 lines, the modules import each other without a cycle (at module level, where a cycle breaks
imports), and the core imports nothing of the server."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIMIT = 620     # "about 600 lines"


def _modules(folder: str, package: str) -> dict[str, pathlib.Path]:
    out = {}
    for path in (ROOT / folder).rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        name = ".".join((package,) + parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The modules of ``modules`` that ``name`` imports at module level (``if TYPE_CHECKING:`` blocks aside;
    ``from . import sub`` needs the submodule, not the package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else subs + [base]
            found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_module_of_the_server_is_over_about_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "server").rglob("*.py")
            if "migrations" not in p.parts and (n := len(p.read_text(encoding="utf-8").splitlines())) > LIMIT}
    assert long == {}


def test_the_server_has_no_import_cycle():
    modules = _modules("server", "loyalty.server")
    edges = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert sum(map(len, edges.values())) > 100         # the walk sees the imports at all
    state: dict[str, int] = {}
    cycles = []

    def visit(name, trail):
        state[name] = 1
        for other in sorted(edges[name]):
            if state.get(other) == 1:
                cycles.append(trail[trail.index(other):] + [other])
            elif other not in state:
                visit(other, trail + [other])
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_core_imports_nothing_of_the_server():
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith(("loyalty.server", "..server", "loyalty.cli", "loyalty.clients"))
                           for n in names), (path, names)
