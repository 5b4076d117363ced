"""House rules that no single feature test would catch: no import circles in the library, the command
line on top of it, stages below the pipeline, and nothing left behind by a killed process."""

import ast
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

import MedCLIPSAMLib

PACKAGE = Path(MedCLIPSAMLib.__file__).parent
ROOT = PACKAGE.parent


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name, path):
    """The library modules `name` imports anywhere in its file (lazy imports inside functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: level 1 is the module's own package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # "from . import cache" imports the submodule cache; "from .x import f" imports x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # another package's name shrinks to ""
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_the_import_graph_is_read_correctly():
    # the checks below are only as good as the graph: spot-check each kind of import statement
    assert "MedCLIPSAMLib.models.cache" in GRAPH["MedCLIPSAMLib.models.clip"]          # from . import cache
    assert "MedCLIPSAMLib.runtime" in GRAPH["MedCLIPSAMLib.models.clip"]               # from ..runtime import
    assert "MedCLIPSAMLib.models.download" in GRAPH["MedCLIPSAMLib.models.clip"]       # lazy, in a function
    assert "MedCLIPSAMLib.models" in GRAPH["MedCLIPSAMLib.training.medclipseg"]         # from ..models import f
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_in_the_library():
    # a circle means two files that cannot be read or changed alone
    assert _cycles(GRAPH) == []


def test_only_the_command_line_imports_the_command_line():
    # the library is usable without its argument parsing; `python -m MedCLIPSAMLib` is the command line
    below = [n for n in GRAPH if not n.startswith("MedCLIPSAMLib.cli") and n != "MedCLIPSAMLib.__main__"]
    offenders = {name: sorted(t for t in GRAPH[name] if t.startswith("MedCLIPSAMLib.cli")) for name in below}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("stage", ["io", "models", "saliency", "postprocess"])
def test_stages_do_not_reach_up(stage):
    """The stages sit below the drivers that combine them (pipeline, training, service, cli)."""
    above = ("pipeline", "training", "service", "cli")
    offenders = {name: sorted(t for t in targets if t.split(".")[1:2] and t.split(".")[1] in above)
                 for name, targets in GRAPH.items() if name.startswith(f"MedCLIPSAMLib.{stage}")}
    assert {k: v for k, v in offenders.items() if v} == {}


# --------------------------------------------------------------------------------------------------
# warnings: ours are errors in the suite (pyproject's filterwarnings), other packages' stay warnings


def test_a_warning_from_the_library_fails_the_suite():
    with pytest.raises(UserWarning):
        warnings.warn_explicit("ours", UserWarning, "clip.py", 1, module="MedCLIPSAMLib.models.clip", registry={})


def test_a_warning_from_another_package_is_only_reported():
    with warnings.catch_warnings(record=True) as caught:  # keeps the suite's filters, records instead of printing
        warnings.warn_explicit("theirs", FutureWarning, "_script.py", 1, module="torch.jit._script", registry={})
    assert [str(w.message) for w in caught] == ["theirs"]


def test_sam2_predictor_does_not_warn(tiny_sam2):
    from MedCLIPSAMLib.models.sam import image_predictor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image_predictor(tiny_sam2)
    assert [str(w.message) for w in caught] == []


# --------------------------------------------------------------------------------------------------
# scratch folders of killed processes


def _killed_while_holding(tmp_path, code):
    """Run `code` (which prints a path it created, then blocks) in a real process, SIGKILL it, return the path."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.exists()  # SIGKILL: no cleanup ran
    return left


def test_a_killed_process_scratch_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    from MedCLIPSAMLib.runtime import scratch_folder, scratch_root

    left = _killed_while_holding(tmp_path, "from MedCLIPSAMLib.runtime import scratch_folder\n"
                                           "with scratch_folder() as f:\n"
                                           "    (f / 'open_clip_config.json').write_text('{}')\n"
                                           "    print(f, flush=True)\n"
                                           "    input()\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert left.parent == scratch_root() and scratch_root().parent == tmp_path
    alive = left.parent / f"{os.getppid()}-busy"  # a running process's folder is left alone
    alive.mkdir()
    with scratch_folder() as mine:
        assert mine.is_dir() and not left.exists() and alive.is_dir()
    assert sorted(left.parent.iterdir()) == [alive]


def test_a_killed_process_partial_output_is_removed_by_the_next_write(tmp_path):
    from MedCLIPSAMLib.runtime import atomic_output

    out = tmp_path / "out.seg.nrrd"
    left = _killed_while_holding(tmp_path, "from MedCLIPSAMLib.runtime import atomic_output\n"
                                           f"with atomic_output({str(out)!r}) as tmp:\n"
                                           "    open(tmp, 'w').write('half')\n"
                                           "    print(tmp, flush=True)\n"
                                           "    input()\n")
    dead = left.name[len(".out.seg.nrrd."):].split("-")[0]
    other = tmp_path / f".other.nrrd.{dead}-x.part.nrrd"  # another output's: left for that output's next write
    other.write_text("")
    with atomic_output(out) as tmp:
        Path(tmp).write_text("whole")
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == [other.name, out.name]


def test_loading_clip_cleans_up_its_scratch_folder(tmp_path, monkeypatch):
    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.runtime import scratch_root

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load_clip("tiny-random", reuse=False)
    assert scratch_root().parent == tmp_path and list(scratch_root().iterdir()) == []
