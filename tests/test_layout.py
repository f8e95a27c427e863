"""The house: one installed library (`emovlm_kd`) plus the four Hub files, no import cycles, nothing imported by a
name in a string, and a wheel that ships the configs and the metric modules but no top-level `train` / `eval`.
`app.py` (the Hub Space entry point) stays in the source tree, follows the same import rules and does nothing when
imported."""

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import HEAVY, imported_by_a_child

ROOT = Path(__file__).resolve().parents[1]
HUB_MODULES = ("configuration_emovlm_kd", "modeling_emovlm_kd", "pipeline_emovlm_kd", "scoring_emovlm_kd")
SOURCE_TREE_SCRIPTS = ("app",)  # top-level scripts of the source tree, not installed


def project_modules():
    """Module name -> file, for the library (with its mapped configs and metrics packages), the Hub files, `app.py`
    and the benchmark scripts."""
    modules = {name: ROOT / f"{name}.py" for name in (*HUB_MODULES, *SOURCE_TREE_SCRIPTS)}
    folders = {"emovlm_kd": ROOT / "emovlm_kd", "emovlm_kd.configs": ROOT / "train" / "configs",
               "emovlm_kd.metrics": ROOT / "eval" / "metrics", "benchmarks": ROOT / "benchmarks"}
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "emovlm_kd" and parts[0] in ("configs", "metrics"):
                continue
            if package == "emovlm_kd.metrics" and len(parts) > 1:  # metric scripts, loaded by evaluate.load(path)
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name, path, known):
    """Project modules that `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_module_imports_one_that_imports_it_back():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    cycles = []

    def visit(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [], set(), done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "emovlm_kd.cli" not in set().union(*graph.values()), "only the entry point imports the CLI"


# The floors, lowest first: a module imports only modules on its own floor or below (at module level or inside a
# function). Training and evaluation share floor 3, where evaluation may import training (the ablations retrain the
# head and the gate with the stage code, on a run's caches) and training never imports evaluation: (3, 0) < (3, 1).
HUB_FLOOR, LIBRARY_FLOOR, DATA_FLOOR, TRAINING_FLOOR, EVALUATION_FLOOR = (0,), (1,), (2,), (3, 0), (3, 1)
PACKAGE_FLOORS = {"data": DATA_FLOOR, "training": TRAINING_FLOOR, "evaluation": EVALUATION_FLOOR, "commands": (4,),
                  "cli": (5,)}


def floor_of(name):
    """The floor of a project module; None for the source tree's scripts (app.py, benchmarks/), which sit on top."""
    if name in HUB_MODULES:
        return HUB_FLOOR
    parts = name.split(".")
    if parts[0] != "emovlm_kd":
        return None
    return PACKAGE_FLOORS.get(parts[1], LIBRARY_FLOOR) if len(parts) > 1 else LIBRARY_FLOOR


def test_no_import_runs_back_up_a_floor():
    """Hub files 0, emovlm_kd/*.py 1 (settings, runtime, hub, demo...), emovlm_kd/data 2, emovlm_kd/training and
    emovlm_kd/evaluation 3 (evaluation above training), emovlm_kd/commands 4, the CLI 5: no arrow points up."""
    modules = project_modules()
    upward = []
    for name, path in sorted(modules.items()):
        low = floor_of(name)
        for target in sorted(imports_of(name, path, modules)):
            high = floor_of(target)
            if low is not None and high is not None and high > low:
                upward.append(f"{name} (floor {'.'.join(map(str, low))}) imports {target} "
                              f"(floor {'.'.join(map(str, high))})")
    assert not upward, "imports running back up a floor:\n" + "\n".join(upward)


def test_the_floors_cover_every_package():
    """A new package of emovlm_kd gets a floor here (else it would count as floor 1 unnoticed)."""
    packages = {path.parent.name for path in (ROOT / "emovlm_kd").glob("*/__init__.py")}
    assert packages <= set(PACKAGE_FLOORS), sorted(packages - set(PACKAGE_FLOORS))


def test_nothing_is_imported_by_a_name_in_a_string():
    dynamic = {"import_module", "__import__", "run_module", "run_path", "spec_from_file_location", "load_source"}
    offenders = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", getattr(node.func, "attr", None))
                if called in dynamic:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {called}")
    assert not offenders, offenders


def test_top_level_python_files_are_the_hub_files_setup_and_app():
    assert {p.stem for p in ROOT.glob("*.py")} == {*HUB_MODULES, *SOURCE_TREE_SCRIPTS, "setup"}


def test_importing_app_does_nothing():
    """A Space runs `python app.py`; importing it (as tools and tests do) loads no model and imports neither torch
    nor gradio, even when the model it names does not exist."""
    imported, _ = imported_by_a_child("import app", (*HEAVY, "gradio"),
                                      env={"EMOVLM_KD_MODEL": str(ROOT / "no-such-model")})
    assert imported == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the tracked files (a build/ folder in the checkout could hold stale modules)."""
    import shutil

    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return next(out.glob("emovlm_kd-*.whl"))


def test_the_wheel_installs_one_library_with_its_configs_and_metrics(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"emovlm_kd", *(f"{m}.py" for m in HUB_MODULES)}, sorted(top)
    shipped_configs = {Path(n).stem for n in names if n.startswith("emovlm_kd/configs/") and n.endswith(".yaml")}
    assert shipped_configs == {p.stem for p in (ROOT / "train" / "configs").glob("*.yaml")}
    metrics = {n for n in names if n.startswith("emovlm_kd/metrics/")}
    for folder in (p for p in (ROOT / "eval" / "metrics").iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert f"emovlm_kd/metrics/{folder.name}/{folder.name}.py" in metrics


def test_commands_run_from_the_installed_wheel(wheel, tmp_path):
    """Installed into a folder of its own and run from elsewhere: the shipped config is found by the name the README
    uses, the metric modules load by path, and the library is the wheel's, not this checkout's."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    check = ("import emovlm_kd, sys; from emovlm_kd.metrics import load_metric; "
             "print(emovlm_kd.__file__); print(load_metric('accuracy').compute(predictions=[1, 0], references=[1, 1]))")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith(str(target)) and "0.5" in result.stdout
    result = subprocess.run([sys.executable, "-m", "emovlm_kd.cli", "train", "--config", "configs/fi.yaml", "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Qwen/Qwen2-VL-7B-Instruct" in result.stdout and "runs/fi" in result.stdout


def test_the_dataset_readers_and_the_image_helpers_import_no_torch():
    """A bad `--dataset` is refused in about a second: reading a dataset's layout (and `emovlm_kd.images`' file
    listing) never waits for torch or transformers, which `prepare_image`'s pipeline file imports (loaded on use)."""
    imported, _ = imported_by_a_child("import sys, emovlm_kd.data.loading, emovlm_kd.images as images, "
                                      "emovlm_kd.commands.split", (*HEAVY, "pipeline_emovlm_kd"),
                                      then="assert callable(images.prepare_image) and 'pipeline_emovlm_kd' in "
                                           "sys.modules\n")
    assert imported == []
