"""The house rules: the import-linter contracts in pyproject.toml hold, and the dependencies are declared exactly."""

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_import_contracts_hold():
    linter = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout.split("Contracts:")[-1]


def imported_distributions(folder: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    """The installed distributions whose top-level modules the code under `folder` (less `skip`) imports."""
    owners = packages_distributions()
    names: set[str] = set()
    for file in folder.rglob("*.py"):
        if any(file.is_relative_to(skipped) for skipped in skip):
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {normalized(dist) for name in names if name != "mergebot" for dist in owners.get(name, [])}


def normalized(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(extra: str | None = None) -> set[str]:
    project = PYPROJECT["project"]
    requirements = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {normalized(r) for r in requirements}


def test_what_the_code_imports_is_declared_and_nothing_more():
    package = ROOT / "mergebot"
    # what the demo, ray and llama-cpp extras are for
    extras = (
        package / "dev",
        package / "daemon" / "ray_executor.py",
        package / "gguf" / "quantize.py",
        package / "pipeline" / "gguf_llama.py",
    )
    assert imported_distributions(package, skip=extras) <= declared()
    # accelerate is transformers' to import: its GGUF loader (the check of every GGUF file) needs it
    assert declared() - {"accelerate"} <= imported_distributions(package)
    assert imported_distributions(package) <= declared() | declared("demo") | declared("ray") | declared("llama-cpp")


def test_what_only_tests_import_is_in_the_test_extra():
    used_by_tests = imported_distributions(ROOT / "tests") | imported_distributions(ROOT / "bench")
    # llama.cpp's own tests need the llama-cpp extra (README, quick start), which pip builds from source
    assert used_by_tests - declared() - declared("demo") - declared("llama-cpp") <= declared("test")
