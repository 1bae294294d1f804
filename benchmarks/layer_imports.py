"""Benchmark the Lambda layer's shipped bytecode: layer sizes and the search function's import CPU with and without it.

    .venv/bin/python benchmarks/layer_imports.py [--rounds 5] [--python /path/to/python3.13] [--reuse]

Builds the layer and the search function's package with infra/Makefile once without bytecode (BYTECODE=none),
copies both and runs the Makefile's own compile steps (layer-bytecode, function-bytecode) on the copies. Prints
the CPU, the sizes (unzipped, as Lambda counts them against its 250 MiB; and zipped with deflate, as `sam build`
uploads them), then imports the search function (functions/search/app.py without configuration, so it touches
no network, plus the modules its init threads import) in a fresh interpreter of the runtime's version, the two
builds alternated for --rounds, with /var/task, /opt/python and the Lambda runtime's boto3 on sys.path. Lambda's
/opt and /var/task are read-only, so a module without a usable .pyc is compiled at every cold start and the
result thrown away: PYTHONDONTWRITEBYTECODE=1 does the same here (the script checks that nothing was written).
Each child counts the source files it compiled (an audit hook on `compile`), so "compiled 0" proves the shipped
pycs were used. Prints the median CPU seconds of the imports (and of the whole process), their ratio, and
`-X importtime` self time per top-level package for both builds. The default run takes ~2-3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REPO, cpu_description  # noqa: E402

MAKEFILE = REPO / "infra" / "Makefile"
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024  # function + layers, unzipped: 262,144,000 bytes
BOTO3_PIN = "boto3==1.44.8"  # the runtime's boto3, as scripts/sam_local/setup.sh puts in its image
# What the search function's init imports besides app.py's own imports (its init threads' modules).
INIT_MODULES = [
    "clipsearch.encoders", "clipsearch.query_cache", "clipsearch.search", "clipsearch.adapters.postgres_catalog",
    "clipsearch.adapters.s3_store", "clipsearch.adapters.faiss_index", "clipsearch.adapters.lambda_shards",
    "onnxruntime", "faiss", "tokenizers", "psycopg", "numpy", "PIL.Image",
]

CHILD = r"""
import importlib, json, sys, time
compiled = []
def count_compiles(event, args):
    if event == "compile" and isinstance(args[1], str) and args[1].endswith(".py"):
        compiled.append(args[1])
sys.addaudithook(count_compiles)
start = time.process_time()
import app
for name in sys.argv[1:]:
    importlib.import_module(name)
cpu = time.process_time() - start
print(json.dumps({"import_cpu_s": cpu, "compiled": len(compiled), "compiled_sample": compiled[:3],
                  "modules": len(sys.modules), "python": sys.version.split()[0]}))
"""


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def make(target: str, cwd: Path, artifacts: Path, *variables: str) -> None:
    artifacts.mkdir(parents=True, exist_ok=True)
    run(["make", "--no-print-directory", "-f", str(MAKEFILE), target, f"ARTIFACTS_DIR={artifacts}", *variables], cwd=cwd)


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def count_files(root: Path, pattern: str) -> int:
    return sum(1 for _ in root.rglob(pattern))


def zipped_bytes(root: Path, target: Path) -> int:
    """The tree zipped as `sam build`/`sam deploy` do it (zipfile, deflate at the default level)."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root).as_posix())
    return target.stat().st_size


def lambda_runtime_boto3(work: Path, python: str) -> Path:
    """boto3 for the runtime's Python, with its bytecode (the Lambda runtime ships it compiled)."""
    target = work / "runtime"
    if not (target / "boto3").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        version = run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout.strip()
        run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
             "--only-binary=:all:", "--implementation", "cp", "--python-version", version,
             "--platform", "manylinux2014_x86_64", "--target", str(target), BOTO3_PIN])
        run([python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash", str(target)])
    return target


def child_environment(build: Path, runtime: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1", "PYTHONPATH": os.pathsep.join([str(build / "task"), str(build / "layer" / "python"),
                                                                  str(runtime)]),
    }


def child_command(python: str, build: Path, runtime: Path, docker_image: str | None, *options: str) -> dict:
    """How to start the importing interpreter: here, or in the Lambda image with Lambda's read-only mounts."""
    if docker_image is None:
        return {"command": [python, *options, "-c", CHILD, *INIT_MODULES], "cwd": build / "task",
                "env": child_environment(build, runtime)}
    mounts = [f"{build / 'layer'}:/opt:ro", f"{build / 'task'}:/var/task:ro", f"{runtime}:/var/bench-runtime:ro"]
    return {"command": ["docker", "run", "--rm", "--network", "none", *(part for mount in mounts for part in ("-v", mount)),
                     "-e", "PYTHONPATH=/var/task:/opt/python:/var/bench-runtime", "-w", "/var/task",
                     "--entrypoint", python, docker_image, *options, "-c", CHILD, *INIT_MODULES],
            "cwd": None, "env": None}


def import_once(python: str, build: Path, runtime: Path, docker_image: str | None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    result = run(**child_command(python, build, runtime, docker_image))
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # In a container the child is not ours: only its own measurement of the imports counts.
    measured["process_cpu_s"] = None if docker_image else (
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    measured["wall_s"] = wall
    return measured


def importtime_by_package(python: str, build: Path, runtime: Path, docker_image: str | None) -> dict[str, float]:
    """Self import time (seconds) per top-level package, from one `-X importtime` run."""
    result = run(**child_command(python, build, runtime, docker_image, "-X", "importtime"))
    totals: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        totals[name.split(".")[0]] += int(self_us) / 1e6
    return dict(totals)


def lambda_python(requested: str | None) -> str:
    if requested:
        return requested
    found = run(["make", "--no-print-directory", "-f", str(MAKEFILE), "print-lambda-python"], cwd=REPO).stdout.strip()
    if not found:
        raise SystemExit("no python of the runtime's version found (infra/Makefile print-lambda-python): give --python")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated imports of each build")
    parser.add_argument("--python", help="an interpreter of the runtime's version (default: the Makefile's choice)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "layer_imports")
    parser.add_argument("--reuse", action="store_true", help="keep the builds of an earlier run in --work")
    parser.add_argument("--docker-image", help="import in this image instead (e.g. sam local's "
                        "public.ecr.aws/lambda/python:3.13-x86_64, never pulled), layer and task mounted read-only; "
                        "--python is then the image's interpreter (default /usr/bin/python3.13)")
    args = parser.parse_args()

    host_python = lambda_python(None if args.docker_image else args.python)
    python = (args.python or "/usr/bin/python3.13") if args.docker_image else host_python
    print(f"CPU: {cpu_description()}")
    print(f"load average: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    print(f"interpreter: {python}" + (f" in {args.docker_image} (read-only mounts, no network)" if args.docker_image
                                       else " (PYTHONDONTWRITEBYTECODE=1 stands for Lambda's read-only mounts)"))
    without, with_bytecode = args.work / "without-bytecode", args.work / "with-bytecode"
    if not (args.reuse and (with_bytecode / "layer" / "python").is_dir()):
        for build in (without, with_bytecode):
            shutil.rmtree(build, ignore_errors=True)
        started = time.perf_counter()
        make("build-ClipsearchLayer", REPO / "shared", without / "layer", "BYTECODE=none")
        make("build-SearchFunction", REPO / "functions" / "search", without / "task", "BYTECODE=none")
        built = time.perf_counter() - started
        shutil.copytree(without, with_bytecode)
        started = time.perf_counter()
        make("layer-bytecode", REPO / "shared", with_bytecode / "layer", f"LAMBDA_PYTHON={host_python}")
        make("function-bytecode", REPO / "functions" / "search", with_bytecode / "task", f"LAMBDA_PYTHON={host_python}")
        print(f"layer build {built:.1f} s wall; the Makefile's compile steps {time.perf_counter() - started:.1f} s wall")
    runtime = lambda_runtime_boto3(args.work, host_python)

    print(f"\nsizes (Lambda's limit for function + layers: {LAMBDA_UNZIPPED_LIMIT:,} bytes unzipped)")
    sizes = {}
    for label, build in (("without bytecode", without), ("with bytecode", with_bytecode)):
        layer, task = build / "layer", build / "task"
        unzipped = tree_bytes(layer)
        total = unzipped + tree_bytes(task)
        zipped = zipped_bytes(layer, args.work / f"{build.name}-layer.zip")
        sizes[label] = (unzipped, zipped)
        print(f"  {label:17} layer {unzipped:,} B unzipped ({unzipped / 1e6:.1f} MB), zip {zipped:,} B "
              f"({zipped / 1e6:.1f} MB); .py {count_files(layer, '*.py')}, .pyc {count_files(layer, '*.pyc')}; "
              f"with the search function {total:,} B: {LAMBDA_UNZIPPED_LIMIT - total:,} B under the limit")
    (u0, z0), (u1, z1) = sizes["without bytecode"], sizes["with bytecode"]
    print(f"  bytecode adds {u1 - u0:+,} B unzipped, {z1 - z0:+,} B zipped")

    pyc_counts = {build: count_files(build, "*.pyc") for build in (without, with_bytecode)}
    results: dict[str, list[dict]] = {"without bytecode": [], "with bytecode": []}
    import_once(python, with_bytecode, runtime, args.docker_image)  # page cache warm for both: read either way
    import_once(python, without, runtime, args.docker_image)
    for _ in range(args.rounds):
        for label, build in (("without bytecode", without), ("with bytecode", with_bytecode)):
            results[label].append(import_once(python, build, runtime, args.docker_image))
    assert pyc_counts == {build: count_files(build, "*.pyc") for build in (without, with_bytecode)}, "a run wrote bytecode"

    print(f"\nimporting the search function ({args.rounds} alternated rounds, {results['with bytecode'][0]['python']}, "
          f"{results['with bytecode'][0]['modules']} modules)")
    medians = {}
    for label, runs in results.items():
        imports = [run_["import_cpu_s"] for run_ in runs]
        process = [run_["process_cpu_s"] for run_ in runs if run_["process_cpu_s"] is not None]
        walls = [run_["wall_s"] for run_ in runs]
        compiled = sorted({run_["compiled"] for run_ in runs})
        medians[label] = statistics.median(imports)
        process_cpu = f", whole process CPU {statistics.median(process):.3f} s" if process else ""
        example = f" e.g. {runs[0]['compiled_sample'][:2]}" if runs[0]["compiled"] else ""
        print(f"  {label:17} import CPU median {statistics.median(imports):.3f} s (range {min(imports):.3f}-"
              f"{max(imports):.3f}){process_cpu}, wall {statistics.median(walls):.3f} s; "
              f"source files compiled per run: {compiled}{example}")
    print(f"  ratio without / with bytecode (import CPU): {medians['without bytecode'] / medians['with bytecode']:.2f}x")

    print("\n-X importtime, self seconds per top-level package (one run each), the 12 largest without bytecode")
    breakdown = {label: importtime_by_package(python, build, runtime, args.docker_image)
                 for label, build in (("without bytecode", without), ("with bytecode", with_bytecode))}
    print(f"  {'package':24} {'without':>9} {'with':>9}")
    for name, seconds in sorted(breakdown["without bytecode"].items(), key=lambda item: -item[1])[:12]:
        print(f"  {name:24} {seconds:9.3f} {breakdown['with bytecode'].get(name, 0.0):9.3f}")
    print(f"  {'(all)':24} {sum(breakdown['without bytecode'].values()):9.3f} "
          f"{sum(breakdown['with bytecode'].values()):9.3f}")
    print(f"load average: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
