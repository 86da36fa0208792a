"""The package's layers (README.md, Development): every module has one, and imports only from its
own layer or those below it. A new module must be given a layer here; an import that points
up fails this test, which says where the idea belongs instead."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "eketwist"

LAYERS = [
    # 0. core: pure functions and tables, no I/O
    {"errors", "pbkdf", "spake2plus", "records", "textsafe", "guard", "logs", "tuning", "sizes"},
    # 1. wire: the codec for frames and messages, and the protocol's constants and rules
    {"wire"},
    # 2. machines: the handshake and the requests, both sides, no I/O
    {"verifier", "serving", "prover", "requesting"},
    # 3. protocols and storage: Twisted glue, the client's fast start, a user's root, files
    {"connection", "server", "transfers", "realm", "client_protocol", "prelude", "storage", "files", "userdb", "proxy", "quotas"},
    # 4. edges: the twistd plugin's service, the client and users commands
    {"tap", "service", "sdnotify", "exposure", "client", "arguments", "commands", "manage", "sync", "globs", "plan",
     "report", "users", "__main__", "__init__"},
]
LAYER_OF = {module: number for number, modules in enumerate(LAYERS) for module in modules}


def imports_of(path):
    """The eketwist modules `path` imports (relative or absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "eketwist":
                parts = node.module.split(".")
                names = parts[1:2] if len(parts) > 1 else [alias.name for alias in node.names]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("eketwist."))
    return found - {path.stem}


def test_every_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules - LAYER_OF.keys() == set(), "give these modules a layer in LAYERS"
    assert LAYER_OF.keys() - modules == set(), "these modules are gone: take them out of LAYERS"


def test_imports_point_down_or_sideways():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        own = LAYER_OF[path.stem]
        for imported in sorted(imports_of(path)):
            if LAYER_OF.get(imported, -1) > own:
                upward.append(f"{path.stem} (layer {own}) imports {imported} (layer {LAYER_OF[imported]})")
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path):
    module = tmp_path / "wire.py"
    module.write_text("from . import server\nfrom eketwist.storage import Root\nimport eketwist.client\n")
    assert imports_of(module) == {"server", "storage", "client"}
