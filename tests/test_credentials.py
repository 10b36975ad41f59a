"""Credentials never land in committed files or output: `signflow source set` refuses a URL that
carries them (an https login goes in ~/.netrc instead); a data.dvc edited by hand to hold one still
never shows it in the logs, `signflow source` output, data/raw/SOURCE.json, the MLflow run and
version, the receipt or the model card; a tracking URI's login stays out of the receipt and of
MLflow's own output. SOURCE.json names a source inside the project relative to it."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import yaml

from signflow import dvc_state
from signflow._redact import redact_url, url_credentials
from signflow.cli import main
from signflow.layout import ModelOutputs
from signflow.source import CHANGED, SourceError, render_data_dvc, set_source, sync_source
from tests.helpers import EtagServer, make_project, padded_archive, tiny_params

SECRETS = ("s3cret", "T0KEN", "bob")


def _clean(text: str) -> bool:
    return not any(secret in text for secret in SECRETS)


def test_redact_url_hides_userinfo_and_query_values():
    url = "https://bob:s3cret@example.org/a/data.zip?token=T0KEN&X-Amz-Signature=T0KEN#access_token=T0KEN"
    assert redact_url(url) == "https://***@example.org/a/data.zip?token=***&X-Amz-Signature=***#access_token=***"
    assert redact_url(f"could not fetch {url}: refused") == f"could not fetch {redact_url(url)}: refused"
    assert redact_url("/data/archive.zip") == "/data/archive.zip"


def test_fetching_and_extracting_never_show_the_credentials(tmp_path, class_folders, caplog, capsys, monkeypatch):
    server = EtagServer(padded_archive(class_folders, tmp_path / "v1.zip", padding_mb=1))
    try:
        url = server.url.replace("http://", "http://bob:s3cret@") + "?token=T0KEN"
        project = make_project(tmp_path, tmp_path / "v1.zip")
        (project / "data.dvc").write_text(render_data_dvc(url, True))  # written by hand: signflow refuses it
        with caplog.at_level(logging.DEBUG):
            with dvc_state.open_repo(project) as repo:
                note = sync_source(repo, project).note
            assert main(["source", "check", "--project-dir", str(project)]) == 0
            monkeypatch.chdir(project)
            assert main(["extract"]) == 0
    finally:
        server.stop()
    out, err = capsys.readouterr()
    assert "http://***@127.0.0.1" in out
    source_json = (project / "data" / "raw" / "SOURCE.json").read_text()
    for text in (note, out, err, caplog.text, source_json):
        assert _clean(text), text
    assert json.loads(source_json)["source"] == "data/source"


def test_the_registry_and_the_model_card_never_show_the_credentials(trained, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from signflow.evaluate import evaluate
    from signflow.export import export_onnx
    from signflow.register import register_run

    params, raw, split, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "data.dvc").write_text(render_data_dvc("https://bob:s3cret@example.org/d.zip?token=T0KEN", True))
    outputs = ModelOutputs(tmp_path / "reports", tmp_path / "m.onnx", tmp_path / "card.md", tmp_path / "rec.json")
    evaluate(params.evaluate, tmp_path / "model.pt", raw, split, outputs.reports, tmp_path / "train_log.csv")
    export_onnx(params.export, tmp_path / "model.pt", outputs.onnx)
    result = register_run(params, tmp_path / "model.pt", outputs, project_dir=tmp_path, split_dir=split)
    client = MlflowClient()
    version = client.get_model_version(params.register.model_name, result.version)
    run = client.get_run(version.run_id)
    assert version.tags["signflow.data_source"] == "https://***@example.org/d.zip?token=***"
    stored = [outputs.model_card.read_text(), outputs.receipt.read_text(), version.description]
    stored += [json.dumps(version.tags), json.dumps(run.data.tags), json.dumps(run.data.params)]
    for text in stored:
        assert _clean(text), text


def test_the_same_source_in_two_clones_gives_the_same_source_json(tmp_path, tiny_zip, monkeypatch):
    """One clone extracts as `dvc repro` does (the command, paths relative to the project), the other
    as the Prefect task does (absolute paths): data/raw, and so its DVC hash, is the same."""
    from signflow.extract import extract_dataset
    from tests.helpers import section

    projects = [tmp_path / "a" / "project", tmp_path / "b" / "project"]
    for project in projects:
        (project / "data").mkdir(parents=True)
        shutil.copy(tiny_zip, project / "data" / "source")
        (project / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    monkeypatch.chdir(projects[0])
    assert main(["extract"]) == 0
    extract_dataset(projects[1] / "data" / "source", projects[1] / "data" / "raw", section("extract"), projects[1])
    records = [(project / "data" / "raw" / "SOURCE.json").read_bytes() for project in projects]
    assert records[0] == records[1]
    assert json.loads(records[0])["source"] == "data/source"


def test_source_set_refuses_a_url_with_credentials_and_says_where_they_go(tmp_path, tiny_zip, capsys):
    project = make_project(tmp_path, tiny_zip)
    before = (project / "data.dvc").read_text()
    for url in (
        "https://bob:s3cret@example.org/d.zip",
        "https://example.org/d.zip?token=T0KEN",
        "s3://bucket/d.zip?X-Amz-Signature=T0KEN",
    ):
        assert main(["source", "set", url, "--project-dir", str(project), "--no-fetch"]) == 1
        err = capsys.readouterr().err
        assert "carries" in err and ".netrc" in err and _clean(err), err
        assert (project / "data.dvc").read_text() == before
    with pytest.raises(SourceError, match="the query parameter 'sig'"):
        set_source(project, "https://example.blob.core.windows.net/c/d.zip?sv=2024&sig=T0KEN", fetch=False)
    assert url_credentials("ssh://git@example.org/data/d.zip") == [], "a login name is not a secret"
    assert url_credentials("https://T0KEN@example.org/d.zip") != [], "over https a bare user is a token"


def test_an_https_login_comes_from_netrc_and_stays_out_of_data_dvc(tmp_path, class_folders, monkeypatch):
    payload = padded_archive(class_folders, tmp_path / "v1.zip", padding_mb=1)
    server = EtagServer(payload, login=("bob", "s3cret"))
    try:
        project = make_project(tmp_path, tmp_path / "v1.zip")
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        with pytest.raises(SourceError):
            set_source(project, server.url)
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login bob password s3cret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        assert set_source(project, server.url).state == CHANGED
    finally:
        server.stop()
    assert (project / "data" / "source").read_bytes() == payload
    assert _clean((project / "data.dvc").read_text())


@pytest.mark.slow
def test_the_receipt_and_mlflow_output_never_show_the_tracking_uri_login(trained, tmp_path):
    """A team server's URI may carry a login. Registering to a real `mlflow server` (on 127.0.0.1, with
    the login in MLFLOW_TRACKING_URI) in a process of its own: its output never shows the password
    (MLflow's "View run ... at URI" line is off) and the receipt stores the URI redacted."""
    import subprocess
    import sys

    from tests.helpers import venv_path
    from tests.test_serving import free_port, start_server, stop_server

    params, *_ = trained
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "macro_f1": 0.9, "test_images": 9}))
    port = free_port()
    env = {**os.environ, "PATH": venv_path()}
    server = start_server(
        [
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "art"),
        ],
        env,
        tmp_path / "server.log",
        f"http://127.0.0.1:{port}/health",
    )
    register = (
        "import sys; from pathlib import Path; from signflow.config import parse_params;"
        "from signflow.register import TEST_SET_TAG, Candidate, register_model; import json;"
        "d = Path(sys.argv[1]); params = parse_params(json.loads(sys.argv[2]));"
        "tags = {TEST_SET_TAG: 'a'};"
        "c = Candidate.from_files(d / 'model.pt', d / 'metrics.json', params.model_dump(mode='json'), tags);"
        "register_model(params.register, c, d / 'rec.json')"
    )
    try:
        run = subprocess.run(
            [sys.executable, "-c", register, str(tmp_path), json.dumps(params.model_dump(mode="json"))],
            env={**env, "MLFLOW_TRACKING_URI": f"http://alice:Pa55w0rd@127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stop_server(server)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Pa55w0rd" not in run.stdout + run.stderr
    receipt = json.loads((tmp_path / "rec.json").read_text())
    assert receipt["tracking_uri"] == f"http://***@127.0.0.1:{port}" and receipt["version"] == "1"
