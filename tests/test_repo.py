"""The repository's own contracts: pinned requirements, no drift between pip and conda files,
explicit packaging, notebooks committed clean, scripts that CI and users run."""
from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _requirements(name: str) -> list[str]:
    return [line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines()
            if line.split("#")[0].strip()]


def test_requirements_are_exact_pins_with_torch_first() -> None:
    lines = _requirements("requirements.txt")
    assert lines[0] == "torch==2.13.0"
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.]*", line), f"not an exact pin: {line}"
    names = [line.split("==")[0].lower() for line in lines]
    assert len(names) == len(set(names)), "a package is pinned twice"
    for needed in ("transformers", "trl", "peft", "papermill", "nbval", "jupyterlab", "networkx", "chess"):
        assert needed in names


def test_nodeps_requirements_are_hash_pinned() -> None:
    for line in _requirements("requirements-nodeps.txt"):
        assert re.fullmatch(r"\S+==\S+ --hash=sha256:[0-9a-f]{64}", line), line


def test_environment_yml_delegates_to_requirements() -> None:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict)]
    assert pip_sections == [["-r requirements.txt"]], "environment.yml must not pin packages itself"
    conda_packages = [d for d in deps if isinstance(d, str)]
    assert sorted(conda_packages) == ["pip", "python=3.11"]


def test_pyproject_lists_packages_explicitly() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    on_disk = sorted(str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "wowlib").rglob("__init__.py"))
    assert sorted(packages) == on_disk


def test_gitignore_keeps_data_runs_and_venv_out() -> None:
    ignored = (REPO / ".gitignore").read_text().split()
    for entry in ("runs/", "data/", ".venv/"):
        assert entry in ignored
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert not [f for f in tracked if f.startswith(("data/", "runs/", ".venv/"))]


def test_notebooks_are_committed_clean() -> None:
    """No outputs, kernelspec python3, a tagged parameters cell with the smoke defaults."""
    assert [p.stem for p in NOTEBOOKS][:2] == ["01_sample_wrong", "02_elicit"]
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name
        params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
        assert 'profile: str = "smoke"' in "".join(params[0]["source"]), path.name


def test_profiles_parse_and_name_their_run() -> None:
    from wowlib import config
    for name in ("smoke", "cpu"):
        settings = config.resolved(config.load_profile(REPO / "configs" / f"{name}.yaml"))
        assert settings["run"] == name and settings["tasks"] and settings["generators"]


def test_scripts_are_executable_and_ci_runs_the_readme_command() -> None:
    for script in ("setup.sh", "run_tests.sh", "run_all.sh", ".ci/run"):
        assert (REPO / script).stat().st_mode & 0o111, f"{script} is not executable"
    readme = (REPO / "README.md").read_text()
    assert "./run_tests.sh" in readme and "./run_all.sh" in readme
    assert "./run_tests.sh" in (REPO / ".ci" / "run").read_text()


def test_the_cpu_cap_turns_off_what_the_cpu_would_choose(monkeypatch) -> None:
    """WOW_CPU_ISA=avx2: no AMX, no AVX-512 kernels, no hardware bf16, whatever this CPU has (CI runs
    the engine and training tests capped, so every machine exercises the smallest CPU's path)."""
    from wowlib import align
    from wowlib.llm import cpu
    from wowlib.llm.engine import decode_kernel
    monkeypatch.setenv("WOW_CPU_ISA", "avx2")
    assert not (cpu.has_amx() or cpu.has_avx512() or cpu.has_bf16() or align.cpu_has_bf16())
    decode_kernel.unavailable_reason.cache_clear()          # asked once per process: the cap is set at start
    try:
        assert "WOW_CPU_ISA" in decode_kernel.unavailable_reason()
    finally:
        decode_kernel.unavailable_reason.cache_clear()
    assert align.resolve_precision(align.AlignConfig(device="cpu")) == "fp32"
    monkeypatch.setenv("WOW_CPU_ISA", "pentium")
    import pytest
    with pytest.raises(ValueError, match="WOW_CPU_ISA"):
        cpu.cap()


def test_no_file_cites_a_document_outside_the_repository() -> None:
    """The design notes live in docs/design.md; nothing points at a plan that is not shipped."""
    import subprocess
    files = subprocess.run(["git", "ls-files", "wowlib", "tests", "notebooks", "docs", "README.md", "benchmarks"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = [f for f in files if (REPO / f).suffix in (".py", ".md", ".ipynb")
                 and any(s in (REPO / f).read_text(encoding="utf-8") for s in ("DESIGN.md", "../shared", "NOTES.md"))
                 and f != "tests/test_repo.py"]
    assert not offenders, offenders


def test_no_module_imports_another_modules_private_names() -> None:
    """A name with a leading underscore is its module's own: no ``from .x import _name`` anywhere."""
    import ast
    found = []
    for path in sorted((REPO / "wowlib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.relative_to(REPO)}:{node.lineno}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
