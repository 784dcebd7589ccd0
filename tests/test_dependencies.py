"""One dependency list: pyproject.toml's, repeated in python_env.yaml and conda.yaml (MLflow's environments),
torch pinned alike everywhere it is installed, and every third-party package imported under src/ declared."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution, where they differ (or the distribution is not installed here)
DISTRIBUTIONS = {"sklearn": "scikit-learn", "yaml": "pyyaml", "psycopg2": "psycopg2-binary",
                 "optuna_dashboard": "optuna-dashboard", "PIL": "pillow"}
# imported only inside try/except ImportError, shipped by a declared distribution
BUNDLED = {"triton": "torch"}  # CUDA builds of torch install triton; doctor reports its absence
ENV_EXTRAS = ("postgres",)  # MLflow's environments also install these extras (multi-worker searches)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _specs(reqs: list[str]) -> dict[str, str]:
    """{canonical name: 'name<spec>'} of requirement strings, the spec normalized by packaging."""
    out = {}
    for r in reqs:
        req = Requirement(r)
        out[canonicalize_name(req.name)] = str(req.specifier)
    return out


def _env_lists() -> dict[str, list[str]]:
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip = next(d["pip"] for d in conda if isinstance(d, dict) and "pip" in d)
    return {"python_env.yaml": yaml.safe_load((ROOT / "python_env.yaml").read_text())["dependencies"],
            "conda.yaml": pip}


def test_environment_files_repeat_pyproject_dependencies():
    project = _pyproject()
    want = _specs(project["dependencies"] + [r for e in ENV_EXTRAS for r in project["optional-dependencies"][e]])
    for name, reqs in _env_lists().items():
        assert len(reqs) == len(set(reqs)), f"{name} lists a package twice"
        got = _specs(reqs)
        assert got == want, f"{name} differs from pyproject.toml: missing {sorted(set(want) - set(got))}, extra " \
                            f"{sorted(set(got) - set(want))}, other specs " \
                            f"{ {k: (got[k], want[k]) for k in set(got) & set(want) if got[k] != want[k]} }"


def test_torch_is_pinned_the_same_way_everywhere():
    spec = _specs(_pyproject()["dependencies"])["torch"]
    assert spec.startswith("=="), "torch is installed first and pinned (.ci/run, README): pin it in pyproject too"
    pins = {f: set(re.findall(r"torch(==[\w.]+)", (ROOT / f).read_text())) for f in ("README.md", ".ci/run")}
    for f, found in pins.items():
        assert found <= {spec}, f"{f} installs torch{found}, pyproject declares torch{spec}"


def _third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files} imported anywhere under src/ (function-level imports included)."""
    out: dict[str, set[str]] = {}
    for p in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top != "scaling_lab":
                    out.setdefault(top, set()).add(p.name)
    return out


def _distributions(module: str) -> list[str]:
    """The distributions that may provide ``module`` (several for e.g. mlflow: mlflow, mlflow-skinny)."""
    if module in DISTRIBUTIONS or module in BUNDLED:
        return [DISTRIBUTIONS.get(module) or BUNDLED[module]]
    return importlib.metadata.packages_distributions().get(module) or [module]


def test_every_imported_package_is_declared():
    project = _pyproject()
    declared = set(_specs(project["dependencies"]))
    declared |= {n for e, reqs in project["optional-dependencies"].items() if e != "dev" for n in _specs(reqs)}
    imports = _third_party_imports()
    assert {"torch", "mlflow", "optuna", "sqlalchemy", "numpy"} <= set(imports)  # the scan sees the imports
    missing = {m: sorted(files) for m, files in imports.items()
               if not {canonicalize_name(d) for d in _distributions(m)} & declared}
    assert not missing, f"imported under src/ but not declared in pyproject.toml: {missing}"
