"""infra/Makefile's bytecode steps: pycs that the runtime's Python loads as shipped, and a loud failure without one.

Runs the Makefile's own targets (layer-bytecode, build-<Function>) on small trees, then imports them with the
interpreter the Makefile chose, from an unzipped copy (new mtimes, as on Lambda) with writes off (as /opt and
/var/task are read-only), counting the source files that interpreter compiles. Skips the compile checks when no
interpreter of the runtime's version is on this machine (the Makefile would then refuse to build).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MAKEFILE = REPO / "infra" / "Makefile"
MAKE = shutil.which("make")
UNCHECKED_HASH_FLAGS = 0b01  # PEP 552: hash-based, check_source off

if MAKE is None:
    pytest.skip("make is not installed", allow_module_level=True)

# Imports the given modules with compile counting; prints what each module's VALUE is, where its code says it
# lives (what a traceback shows) and how many source files had to be compiled.
IMPORT_PROBE = r"""
import importlib, json, sys
compiled = []
sys.addaudithook(lambda event, args: compiled.append(args[1])
                 if event == "compile" and isinstance(args[1], str) and args[1].endswith(".py") else None)
found = {}
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    found[name] = {"value": module.VALUE, "code_file": module.where.__code__.co_filename}
print(json.dumps({"modules": found, "compiled": compiled}))
"""


def make(*arguments: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "--no-print-directory", "-f", str(MAKEFILE), *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def makefile_runtime_version() -> str:
    return re.search(r"^LAMBDA_PYTHON_VERSION := (\S+)$", MAKEFILE.read_text(), re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def lambda_python() -> str:
    found = make("print-lambda-python").stdout.strip()
    if not found:
        pytest.skip(f"no python{makefile_runtime_version()} on this machine (infra/Makefile print-lambda-python): "
                    "cannot check the compiled bytecode")
    return found


def module_source(value: str) -> str:
    return f"VALUE = {value!r}\n\ndef where():\n    return VALUE\n"


def unzipped_copy(tree: Path, destination: Path) -> Path:
    """The tree through a zip and back, as `sam deploy` uploads it and Lambda unpacks it."""
    archive = destination.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as writer:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                writer.write(path, path.relative_to(tree).as_posix())
    with zipfile.ZipFile(archive) as reader:
        reader.extractall(destination)
    return destination


def import_with(python: str, search_path: list[Path], modules: list[str], cwd: Path) -> dict:
    result = subprocess.run(
        [python, "-c", IMPORT_PROBE, *modules], cwd=cwd, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": ":".join(map(str, search_path)), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pyc_header(python: str, pyc: Path) -> tuple[bytes, bytes, int]:
    """(the pyc's magic number, the interpreter's, the pyc's flags)."""
    magic = subprocess.run(
        [python, "-c", "import importlib.util, sys; sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"],
        capture_output=True, text=True, check=True,
    ).stdout
    data = pyc.read_bytes()
    return data[:4], bytes.fromhex(magic), int.from_bytes(data[4:8], "little")


def test_makefile_builds_for_the_templates_runtime():
    runtimes = set(re.findall(r"^\s+Runtime: (python\S+)$", (REPO / "template.yaml").read_text(), re.MULTILINE))
    assert runtimes == {f"python{makefile_runtime_version()}"}


def test_layer_pycs_load_unzipped_without_their_sources(lambda_python: str, tmp_path: Path):
    layer = tmp_path / "layer"
    for relative in ("clipsearch/__init__.py", "clipsearch/sub/__init__.py", "clipsearch/sub/mod.py",
                     "dependency/__init__.py", "dependency/inner.py", "top_level.py"):
        path = layer / "python" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(module_source("built"))

    result = make("layer-bytecode", f"ARTIFACTS_DIR={layer}")
    assert result.returncode == 0, result.stderr

    python = layer / "python"
    assert sorted(path.relative_to(python).as_posix() for path in python.rglob("*.py")) == [
        "clipsearch/__init__.py", "clipsearch/sub/__init__.py", "clipsearch/sub/mod.py"]  # only ours keep sources
    tag = f"cpython-{makefile_runtime_version().replace('.', '')}"
    for pyc in [python / "clipsearch" / "sub" / "__pycache__" / f"mod.{tag}.pyc", python / "dependency" / "inner.pyc",
                python / "top_level.pyc"]:
        magic, interpreter_magic, flags = pyc_header(lambda_python, pyc)
        assert magic == interpreter_magic and flags == UNCHECKED_HASH_FLAGS, pyc

    shipped = unzipped_copy(layer, tmp_path / "opt")
    # An unchecked-hash pyc is used whatever the source says: an edited source proves the pyc was loaded.
    (shipped / "python" / "clipsearch" / "sub" / "mod.py").write_text(module_source("edited"))
    modules = ["clipsearch", "clipsearch.sub.mod", "dependency", "dependency.inner", "top_level"]
    loaded = import_with(lambda_python, [shipped / "python"], modules, cwd=tmp_path)
    assert loaded["compiled"] == []
    assert {name: found["value"] for name, found in loaded["modules"].items()} == dict.fromkeys(modules, "built")
    # Tracebacks name the files where Lambda puts them (code loaded beside its source names the source).
    assert loaded["modules"]["dependency.inner"]["code_file"] == "/opt/python/dependency/inner.py"
    kept_source = shipped / "python" / "clipsearch" / "sub" / "mod.py"
    assert loaded["modules"]["clipsearch.sub.mod"]["code_file"] == str(kept_source)


def test_function_package_ships_its_handlers_bytecode(lambda_python: str, tmp_path: Path):
    source, artifacts = tmp_path / "function", tmp_path / "artifacts"
    source.mkdir()
    artifacts.mkdir()
    (source / "app.py").write_text(module_source("built"))

    result = make("build-SearchFunction", f"ARTIFACTS_DIR={artifacts}", cwd=source)
    assert result.returncode == 0, result.stderr

    assert (artifacts / "app.py").is_file()
    task = unzipped_copy(artifacts, tmp_path / "task")
    loaded = import_with(lambda_python, [task], ["app"], cwd=task)
    assert loaded["compiled"] == []
    assert loaded["modules"]["app"] == {"value": "built", "code_file": str(task / "app.py")}


def test_build_fails_loudly_with_an_interpreter_of_another_version():
    other = sys.executable  # the project's venv Python: not the runtime's version
    if subprocess.run([other, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                      text=True).stdout.strip() == makefile_runtime_version():
        pytest.skip("the test's own Python is the runtime's version")
    result = make("lambda-python-required", f"LAMBDA_PYTHON={other}")
    assert result.returncode != 0
    assert f"is not python{makefile_runtime_version()}" in result.stderr


def test_build_fails_loudly_without_an_interpreter_unless_told_to_ship_none(tmp_path: Path):
    nothing_on_path = {"PATH": str(tmp_path), "PYENV_ROOT": str(tmp_path / "no-pyenv"), "HOME": str(tmp_path)}
    result = make("lambda-python-required", env=nothing_on_path)
    assert result.returncode != 0
    assert f"no python{makefile_runtime_version()} to compile the bytecode with" in result.stderr

    result = make("lambda-python-required", "BYTECODE=none", env=nothing_on_path)
    assert result.returncode == 0
    assert "no bytecode shipped" in result.stderr
