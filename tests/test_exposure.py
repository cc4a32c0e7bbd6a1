"""What the code base must never contain: unpickling, unsafe torch.load, eval/exec, servers open by default."""

import ast
import re

from tests.conftest import ROOT

SOURCES = sorted([*(ROOT / "gptgen").rglob("*.py"), ROOT / "app.py"])


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")), node


def test_no_pickle_no_unsafe_torch_load_no_eval_or_exec():
    assert len(SOURCES) > 15
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                          if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"pickle", "dill", "cloudpickle", "marshal", "shelve"}, path
        for name, call in _calls(tree):
            assert name not in ("eval", "exec", "compile") or isinstance(call.func, ast.Attribute), (path, name)
            on_torch = isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch"
            if name == "load" and on_torch:
                kw = {k.arg: k.value for k in call.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, path


def test_servers_bind_loopback_unless_told():
    from gptgen.cli import parser

    assert parser().parse_args(["serve"]).host == "127.0.0.1"
    app = (ROOT / "app.py").read_text()
    assert re.search(r'GRADIO_SERVER_NAME", "127\.0\.0\.1"', app)  # 0.0.0.0 only where Spaces asks for it
