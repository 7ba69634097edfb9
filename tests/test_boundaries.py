"""Architecture rules that a test enforces."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "mlflow", "optuna"}


def test_ddsm_never_imports_ray_mlflow_optuna():
    offenders = []
    for path in (ROOT / "ddsm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            names += [node.args[0].value for node in [node] if isinstance(node, ast.Call)
                      and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
                      and node.args and isinstance(node.args[0], ast.Constant)]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if str(n).split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_every_ddsm_module_loads_none_of_them():
    mods = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / "ddsm").rglob("*.py"))
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods) + \
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


ADAPTERS = {"ray": "harness/ray_backend.py", "mlflow": "harness/mlflow_io.py", "optuna": "harness/optuna_study.py"}


def _imports(path: Path) -> set[str]:
    """Top-level packages a module imports (import, from-import, importlib.import_module / __import__ of a literal)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def test_each_external_system_has_exactly_one_adapter_module():
    """ray, mlflow and optuna are each imported by one module under harness/, and never by ddsm/ or reports/."""
    users: dict[str, list[str]] = {name: [] for name in ADAPTERS}
    for package in ("harness", "ddsm", "reports"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in _imports(path) & set(ADAPTERS):
                users[name].append(str(path.relative_to(ROOT)))
    assert users == {name: [module] for name, module in ADAPTERS.items()}
