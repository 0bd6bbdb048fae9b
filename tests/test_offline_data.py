"""The data shipped in data/offline/: checksums hold, a refresh reproduces it byte for byte (the converted
files included) and refuses changed upstream files without writing anything, a damaged file names itself."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from h3fusion.cli import main
from h3fusion.config import load_profile
from h3fusion.data import offline, sources
from h3fusion.errors import DataError


def _plain_copy(dest: Path) -> Path:
    """The shipped folder decompressed: what a user's own plain data folder looks like."""
    for name in offline.recorded_checksums():
        file = offline.find(offline.OFFLINE_DIR, name)
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(offline.read_bytes(file))
    return dest


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def shipped_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(offline.OFFLINE_DIR, tmp_path / "offline"))


def test_every_shipped_file_matches_its_checksum_and_every_source_is_shipped():
    assert offline.verify() == []
    shipped = set(offline.recorded_checksums())
    assert {s.local_path for n, s in sources.SOURCES.items() if n != "beavertails_train"} <= shipped
    assert shipped == {f.path for f in offline.FILES}


def test_profiles_read_the_shipped_copies_by_default(monkeypatch):
    monkeypatch.delenv("H3FUSION_DATA_DIR", raising=False)
    profile = load_profile("smoke")
    assert profile.data_dir == offline.OFFLINE_DIR
    assert sources.local_file(profile, "truthfulqa_mc").name == "mc_task.json.xz"
    assert len(sources.load_records(profile, "truthfulqa_mc")) == 817


def test_refresh_from_a_plain_folder_rebuilds_the_same_bytes_including_converted_files(
    tmp_path, shipped_copy
):
    plain = _plain_copy(tmp_path / "plain")
    (plain / "truthfulqa" / "truthful_qa_generation_v0.jsonl").unlink()  # must be rebuilt from the CSV
    before = {
        name: offline.read_bytes(offline.find(shipped_copy, name)) for name in offline.recorded_checksums()
    }
    for file in shipped_copy.rglob("*.xz"):
        file.unlink()
    written = offline.refresh(shipped_copy, from_dir=plain)
    assert sorted(written) == sorted(before)
    assert offline.verify(shipped_copy) == []
    after = {name: offline.read_bytes(offline.find(shipped_copy, name)) for name in written}
    assert after == before


def _fake_origins(tmp_path: Path) -> dict[str, bytes]:
    """What the pinned URLs serve, made from the shipped bytes (the hub gzips BeaverTails; TruthfulQA's
    generation file is derived from its CSV URL)."""
    plain = _plain_copy(tmp_path / "origin")
    served = {}
    for spec in offline.FILES:
        data = (plain / (spec.local_origin or spec.path)).read_bytes()
        served[spec.url] = gzip.compress(data) if spec.url.endswith(".gz") else data
    return served


def test_download_checks_checksums_and_writes_nothing_when_one_file_changed(tmp_path, shipped_copy):
    served = _fake_origins(tmp_path)
    assert len(offline.refresh(shipped_copy, fetch=served.__getitem__)) == len(offline.FILES)
    assert offline.verify(shipped_copy) == []
    before = _snapshot(shipped_copy)
    tampered = dict(served)
    url = next(s.url for s in offline.FILES if s.path == "truthfulqa/v0/mc_task.json")
    tampered[url] = served[url].replace(b'"question"', b'"Question"', 1)
    with pytest.raises(DataError, match=r"nothing was written: truthfulqa/v0/mc_task.json \(sha256"):
        offline.refresh(shipped_copy, fetch=tampered.__getitem__)
    assert _snapshot(shipped_copy) == before


def test_a_damaged_shipped_file_names_itself_and_the_fix(tmp_path, shipped_copy):
    packed = shipped_copy / "alpaca" / "alpaca_random_9k.json.xz"
    packed.write_bytes(packed.read_bytes()[:1000])
    profile = load_profile("smoke", {"data.dir": str(shipped_copy)})
    with pytest.raises(DataError, match=r"alpaca_random_9k.json.xz is damaged.*git checkout"):
        sources.load_records(profile, "alpaca")
    assert offline.verify(shipped_copy) == [
        f"alpaca/alpaca_random_9k.json: damaged ({shown})" for shown in [offline.shown_path(packed)]
    ]


def test_data_check_command_fails_with_exit_2_on_a_changed_file(shipped_copy, monkeypatch, capsys):
    monkeypatch.setattr(offline, "OFFLINE_DIR", shipped_copy)
    assert main(["data", "--check"]) == 0
    packed = shipped_copy / "truthfulqa" / "v0" / "mc_task.json.xz"
    import lzma

    packed.write_bytes(lzma.compress(b"[]"))
    assert main(["data", "--check"]) == 2
    assert "truthfulqa/v0/mc_task.json: checksum" in capsys.readouterr().err
