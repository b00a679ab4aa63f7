"""The layout's import rules (README, "Layout"), enforced on the source and at run time.

    flax_gpt/core/      imports no framework: not jax, flax, optax, torch or torchtext
    torch_reference/    imports only flax_gpt.core from flax_gpt, never the JAX side
"""

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

FRAMEWORKS = {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "torchtext"}


def imported_modules(path):
    """Every module an `import` or `from ... import` in `path` names, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def sources(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"  # the walk must see something
    return files


@pytest.mark.parametrize("path", sources("flax_gpt/core"), ids=lambda p: p.name)
def test_core_imports_no_framework(path):
    bad = [m for m in imported_modules(path) if m.split(".")[0] in FRAMEWORKS]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", sources("torch_reference"), ids=lambda p: p.name)
def test_torch_reference_imports_only_the_core(path):
    bad = [m for m in imported_modules(path) if m.split(".")[0] == "flax_gpt"
           and not (m == "flax_gpt.core" or m.startswith("flax_gpt.core."))]
    bad += [m for m in imported_modules(path) if m.split(".")[0] in FRAMEWORKS - {"torch"}]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def loaded_after(statement):
    """The framework modules loaded after running `statement` in a fresh interpreter."""
    code = (f"import sys\n{statement}\n"
            f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(FRAMEWORKS)!r}))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_core_cli_and_packages_load_no_framework():
    core = " ".join(f"import flax_gpt.core.{p.stem};" for p in sources("flax_gpt/core")
                    if p.stem != "__init__")
    assert loaded_after(f"{core} import flax_gpt, flax_gpt.cli, torch_reference") == set()


def test_torch_reference_loads_no_jax():
    assert loaded_after("import torch_reference.model, torch_reference.train") == {"torch"}


# torchtext loads only with torch 2.3 and is an optional extra: the rest must run without it.
TORCHTEXT_IMPORTERS = {"flax_gpt/prepare.py", "tests/test_torchtext.py", "tests/test_bpe.py"}
PROJECT_FOLDERS = ("flax_gpt", "torch_reference", "tests", "parity_tests", "scripts")  # not a .venv


def test_only_prepare_and_its_equivalence_tests_import_torchtext():
    project = [REPO / "conftest.py", *(p for folder in PROJECT_FOLDERS for p in sources(folder))]
    importers = {str(path.relative_to(REPO)) for path in project
                 if any(m.split(".")[0] == "torchtext" for m in imported_modules(path))}
    assert importers == TORCHTEXT_IMPORTERS


def test_prepare_loads_torchtext_only_when_asked():
    build = ("flax_gpt.prepare.build([('t', b'a b\\nc d\\n')], implementation='builtin', "
             "val_fraction=0.5)")
    assert "torchtext" not in loaded_after(f"import flax_gpt.prepare, tests.datasets; {build}")
