"""The trained-model registry (trained_models.json): a damaged file is reported and never overwritten,
entries it does not understand are kept, and every write is atomic with a backup of the previous file."""

import json

import pytest

from MedCLIPSAMLib import trained_models as tm
from MedCLIPSAMLib.cli import main as cli_main
from MedCLIPSAMLib.errors import MedCLIPSAMError


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(folder))
    return folder


def weak_folder(path, label="brain"):
    """A complete train-weak model folder as the registry checks it (config + the snapshot it lists)."""
    path.mkdir(parents=True)
    (path / tm.WEAK_CONFIG).write_text(json.dumps({"format": tm.WEAK_FORMAT, "label_names": [label],
                                                   "snapshots": [{"file": "snapshot-1.pt", "epoch": 1}]}))
    (path / "snapshot-1.pt").write_bytes(b"weights")
    return path


@pytest.mark.parametrize("damage", ["stray byte", "truncated", "not a registry", "binary"])
def test_damaged_registry_is_reported_and_never_overwritten(tmp_path, home, capsys, damage):
    tm.add(weak_folder(tmp_path / "liver"), "liver")
    path = tm.registry_path()
    good = path.read_text()
    damaged = {"stray byte": good[:10] + "x" + good[10:], "truncated": good[: len(good) // 2],
               "not a registry": '["liver"]', "binary": "\udcff"}[damage]
    path.write_bytes(damaged.encode("utf-8", "surrogateescape"))
    before = path.read_bytes()
    for call in (tm.list_models, lambda: tm.add(weak_folder(tmp_path / "lung", "lung"), "lung"),
                 lambda: tm.remove("liver"), lambda: tm.get("liver")):
        with pytest.raises(MedCLIPSAMError, match="registry .* is damaged") as info:
            call()
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before
    # the CLI says so in one sentence, and adding through it does not replace the file either
    for argv in (["models", "trained"], ["models", "trained", "--add", str(tmp_path / "lung"), "--name", "lung"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("medclipsam: error: the trained-model registry") and "\n" not in err
    assert path.read_bytes() == before


def test_writes_keep_a_backup_and_unknown_entries(tmp_path, home):
    tm.add(weak_folder(tmp_path / "liver"), "liver")
    path = tm.registry_path()
    first = path.read_text()
    assert not (path.parent / (path.name + ".bak")).exists()  # nothing to back up the first time
    # an entry this version does not understand (another kind, a hand edit) survives later writes
    data = json.loads(first)
    data["models"].append({"name": "future", "kind": "some-later-kind", "folder": "/x"})
    path.write_text(json.dumps(data))
    with_foreign = path.read_text()
    tm.add(weak_folder(tmp_path / "lung", "lung"), "lung")
    assert (path.parent / (path.name + ".bak")).read_text() == with_foreign
    stored = json.loads(path.read_text())["models"]
    assert [e["name"] for e in stored] == ["liver", "future", "lung"]
    assert [m["name"] for m in tm.list_models()] == ["liver", "lung"]
    tm.remove("liver")
    assert [e["name"] for e in json.loads(path.read_text())["models"]] == ["future", "lung"]
    assert not list(path.parent.glob(".trained_models-*"))  # no temporary file left
