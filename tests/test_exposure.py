"""What the code base must never contain: unpickling, unsafe torch.load, eval/exec, servers open by default."""

import ast
import contextlib
import inspect
import logging
import re
import types

from tests.conftest import ROOT

SOURCES = sorted([*(ROOT / "gptgen").rglob("*.py"), ROOT / "app.py"])


UNPICKLERS = {"pickle", "dill", "cloudpickle", "marshal", "shelve"}
CODE_RUNNERS = {"eval", "exec", "compile"}  # the builtins; torch.compile and re.compile are other names
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
IMPORTERS = {"__import__", "importlib.import_module", "importlib.__import__"}


class Exposure(ast.NodeVisitor):
    """The banned imports and calls of one module, seen through its import aliases (`import torch as t`,
    `from torch.serialization import load`): a renamed torch.load or eval is still found."""

    def __init__(self, tree: ast.AST) -> None:
        self.names: dict[str, str] = {}  # a local name -> the dotted name it was imported as
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:  # `import torch.serialization` binds torch; `... as ts` binds ts to all of it
                    top = a.name.split(".")[0]
                    self.names[a.asname or top] = a.name if a.asname else top
            elif isinstance(node, ast.ImportFrom):
                self.names |= {a.asname or a.name: f"{node.module or ''}.{a.name}" for a in node.names}
        self.problems: list[str] = []
        self.visit(tree)

    def dotted(self, node: ast.AST) -> str | None:
        """What a name or attribute chain refers to: `t.load` -> torch.load, `builtins.eval` or `eval` -> eval."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id, node.id).removeprefix("builtins.")
        if isinstance(node, ast.Attribute) and (base := self.dotted(node.value)):
            return f"{base}.{node.attr}".removeprefix("builtins.")
        return None

    def check_module(self, node: ast.AST, name: str | None) -> None:
        if name and name.split(".")[0] in UNPICKLERS:
            self.problems.append(f"line {node.lineno}: imports {name}")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.check_module(node, a.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.check_module(node, node.module)
        for a in node.names:
            self.check_module(node, a.name)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func)
        if name in CODE_RUNNERS:
            self.problems.append(f"line {node.lineno}: calls {name}")
        if name in IMPORTERS and node.args and isinstance(node.args[0], ast.Constant):
            self.check_module(node, str(node.args[0].value))
        if name in TORCH_LOADS and not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                                           and k.value.value is True for k in node.keywords):
            self.problems.append(f"line {node.lineno}: {name} without weights_only=True")
        self.generic_visit(node)


def test_the_scan_sees_through_aliases():
    """Each way of reaching a banned call is caught, and the safe torch.load and the other compiles are not:
    a scan that misses a spelling passes on any code."""
    banned = ["import pickle", "from shelve import open", "import marshal as m", "__import__('dill')",
              "import importlib\nimportlib.import_module('cloudpickle.cloudpickle')", "eval('1')", "exec('1')",
              "compile('1', 'f', 'exec')", "import builtins\nbuiltins.eval('1')",
              "from builtins import exec as run\nrun('1')", "import torch\ntorch.load('f')",
              "import torch\ntorch.load('f', weights_only=False)", "import torch\ntorch.serialization.load('f')",
              "import torch as t\nt.load('f')", "from torch import load\nload('f')",
              "from torch.serialization import load as ld\nld('f')", "import torch.serialization as ts\nts.load('f')"]
    for source in banned:
        assert Exposure(ast.parse(source)).problems, source
    allowed = "import re, torch\ntorch.load('f', weights_only=True)\ntorch.compile(m)\nre.compile('x')\nm.eval()"
    assert not Exposure(ast.parse(allowed)).problems


def test_no_pickle_no_unsafe_torch_load_no_eval_or_exec():
    assert len(SOURCES) > 15
    for path in SOURCES:
        problems = Exposure(ast.parse(path.read_text(), str(path))).problems
        assert not problems, (str(path), problems)


def test_servers_bind_loopback_unless_told(monkeypatch, caplog):
    """The default is loopback, the socket is bound where asked, and an open address gets the README's warning
    (checked with the model, the app and uvicorn stubbed out, and no socket open to the network)."""

    from gptgen import serve
    from gptgen.cli import parser

    assert parser().parse_args(["serve"]).host == "127.0.0.1"
    assert inspect.signature(serve.serve).parameters["host"].default == "127.0.0.1"
    with serve.bound_socket("127.0.0.1", 0) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"
    monkeypatch.setattr(serve, "pick_models", lambda models_dir, model: ({}, None))
    engine = types.SimpleNamespace(close=lambda: None)
    monkeypatch.setattr(serve, "ModelShelf", lambda *args: types.SimpleNamespace(engine=engine))
    monkeypatch.setattr(serve, "build_server", lambda shelf, default: None)
    given = types.SimpleNamespace(getsockname=lambda: ("", 8123))  # port 0: the port the system chose is printed
    monkeypatch.setattr(serve, "bound_socket", lambda host, port: contextlib.nullcontext(given))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # serve() sets it; restored after the test
    monkeypatch.setattr(serve, "_Server", lambda config, engine: types.SimpleNamespace(run=lambda sockets: None))
    for host, open_to_all, url in [("127.0.0.1", False, "http://127.0.0.1:8123/"), ("0.0.0.0", True, None),
                                   ("::", True, "http://[::]:8123/"), ("::1", False, "http://[::1]:8123/"),
                                   ("localhost", False, None), ("192.168.1.20", True, None),
                                   ("myhost.example", True, None)]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gptgen.serve"):
            serve.serve("models", host=host, port=0)
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == (1 if open_to_all else 0) and all(host in m and "anyone" in m for m in warned), warned
        assert url is None or any(f"the page is on {url} " in r.getMessage() for r in caplog.records), url
    app = (ROOT / "app.py").read_text()
    assert re.search(r'GRADIO_SERVER_NAME", "127\.0\.0\.1"', app)  # 0.0.0.0 only where Spaces asks for it
