"""data.dvc, DVC's record of the raw dataset's source: an https archive noticed by its ETag and
fetched only when it changed, local archives and folders offline, an unreachable source that never
costs the data already fetched, and `signflow source set` / `check`."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from signflow import dvc_state
from signflow.cli import main
from signflow.extract import extract_dataset
from signflow.source import (
    CHANGED,
    UNCHANGED,
    UNREACHABLE,
    SourceError,
    check_source,
    normalise_source,
    read_source,
    set_source,
    sync_source,
)
from tests.helpers import PER_CLASS, EtagServer, make_image, make_project, padded_archive, section


def _sync(project):
    with dvc_state.open_repo(project) as repo:
        return sync_source(repo, project)


@pytest.fixture
def served(tmp_path, class_folders):
    server = EtagServer(padded_archive(class_folders, tmp_path / "v1.zip"))
    yield server
    server.stop()


def test_https_source_is_fetched_once_and_again_only_when_its_etag_changes(tmp_path, class_folders, served, venv_env):
    project = make_project(tmp_path, served.url)
    first = _sync(project)
    assert first.fetched and served.complete_bodies == 1
    record = yaml.safe_load((project / "data.dvc").read_text())
    assert record["deps"][0]["checksum"] == f'"{served.etag}"', "DVC keeps the server's ETag"
    assert record["outs"][0]["persist"] is True
    info = extract_dataset(project / "data" / "source", tmp_path / "raw", section("extract"))
    assert info.num_images == 3 * PER_CLASS, "the fetched archive (no extension) is extracted safely"

    assert check_source(project)[1] == UNCHANGED
    again = _sync(project)
    assert not again.fetched and again.version == first.version
    assert served.complete_bodies == 1, "unchanged data is not downloaded again"

    make_image(class_folders / "alpha" / "IMG_new.JPG", (200, 40, 40), seed=99)
    served.publish(padded_archive(class_folders, tmp_path / "v2.zip"))
    assert check_source(project)[1] == CHANGED, "new data at the same URL is noticed"
    assert served.complete_bodies == 1, "noticing it downloads nothing"
    changed = _sync(project)
    assert changed.fetched and changed.version != first.version and served.complete_bodies == 2
    assert yaml.safe_load((project / "data.dvc").read_text())["deps"][0]["checksum"] == f'"{served.etag}"'
    info = extract_dataset(project / "data" / "source", tmp_path / "raw", section("extract"))
    assert info.counts["alpha"] == PER_CLASS + 1

    served.stop()
    assert check_source(project)[1] == UNREACHABLE
    down = _sync(project)
    assert down.state == UNREACHABLE and not down.fetched and down.version == changed.version
    assert "not reachable: using the data fetched before" in down.note
    assert down.note.endswith(f"({served.url.split('/')[2]}: connection refused)"), "it says why"
    assert (project / "data" / "source").is_file()
    repro = subprocess.run(["dvc", "repro", "data.dvc"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert repro.returncode != 0 and "does not exist" in repro.stderr
    assert (project / "data" / "source").is_file(), "persist: an unreachable source never removes data/source"
    assert read_source(project).version == changed.version


def test_local_archive_and_folder_sources_work_offline(tmp_path, class_folders, tiny_zip):
    project = make_project(tmp_path, tiny_zip)
    assert _sync(project).fetched and (project / "data" / "source").is_file()
    assert _sync(project).state == UNCHANGED
    tiny_zip.write_bytes(tiny_zip.read_bytes() + b"")  # same content: not new data
    assert check_source(project)[1] == UNCHANGED

    result = set_source(project, str(class_folders))
    assert result.fetched and (project / "data" / "source").is_dir()
    assert not read_source(project).persist, "a changed folder must be replaced, never merged into the old one"
    make_image(class_folders / "beta" / "IMG_extra.JPG", (40, 200, 40), seed=5)
    assert check_source(project)[1] == CHANGED
    assert _sync(project).fetched
    (class_folders / "beta" / "IMG_extra.JPG").unlink()
    _sync(project)
    assert not (project / "data" / "source" / "beta" / "IMG_extra.JPG").exists(), "a deleted file goes away"


def test_normalising_sources(tmp_path, tiny_zip):
    project = tmp_path / "project"
    (project / "incoming").mkdir(parents=True)
    inside = project / "incoming" / "data.zip"
    inside.write_bytes(tiny_zip.read_bytes())
    assert normalise_source(tiny_zip.as_uri(), project) == (str(tiny_zip), True), "file:// becomes a path"
    assert normalise_source(str(inside), project) == ("incoming/data.zip", True), "inside the project: relative"
    assert normalise_source("https://example.org/a/data.zip", project) == ("https://example.org/a/data.zip", True)
    with pytest.raises(SourceError, match="one file over http"):
        normalise_source("https://example.org/datasets/", project)
    with pytest.raises(SourceError, match="no such file"):
        normalise_source(str(tmp_path / "missing.zip"), project)


def test_a_failed_set_leaves_data_dvc_and_the_data_as_they_were(tmp_path, tiny_zip):
    project = make_project(tmp_path, tiny_zip)
    _sync(project)
    before = (project / "data.dvc").read_bytes()
    with pytest.raises(SourceError, match="is not reachable"):
        set_source(project, "http://127.0.0.1:9/gone.zip")
    assert (project / "data.dvc").read_bytes() == before
    assert (project / "data" / "source").is_file() and check_source(project)[1] == UNCHANGED


def test_source_commands(tmp_path, tiny_zip, class_folders, capsys, monkeypatch):
    project = make_project(tmp_path, tiny_zip)
    assert main(["source", "set", str(class_folders), "--project-dir", str(project), "--no-fetch"]) == 0
    assert read_source(project).url == str(class_folders) and read_source(project).version is None
    assert main(["source", "check", "--project-dir", str(project)]) == 0
    assert "not fetched yet" in capsys.readouterr().out
    assert main(["source", "set", str(tiny_zip), "--project-dir", str(project)]) == 0
    assert "fetched" in capsys.readouterr().out
    assert main(["source", "check", "--project-dir", str(project)]) == 0
    out = capsys.readouterr().out
    assert f"source: {tiny_zip}" in out and "state: unchanged" in out
    assert main(["source", "set", "https://example.org/folder/", "--project-dir", str(project)]) == 1
    assert "not a folder" in capsys.readouterr().err
