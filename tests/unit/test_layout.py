"""The package's import graph says what production code needs: no stage imports the toy
helpers, and no pure core imports the Ray module of its stage."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "coincide_ray"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def production_files():
    return [p for p in PACKAGE.rglob("*.py") if "toy" not in p.relative_to(PACKAGE).parts]


def test_no_production_module_imports_the_toy_helpers():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("coincide_ray.toy"))
                 for p in production_files()}
    assert not {k: v for k, v in offenders.items() if v}


def test_pure_cores_never_import_ray_or_a_stage_module():
    for stage in ("embed", "cluster", "select"):
        for path in (PACKAGE / stage).glob("*.py"):
            if path.name == "stage.py":
                continue
            modules = imported_modules(path)
            assert not {m for m in modules if m == "ray" or m.startswith("ray.")}, path
            assert not {m for m in modules if m.endswith(".stage") or ".stage." in m}, path
