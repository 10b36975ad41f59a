"""The page's Train with a Prefect server configured: a real server on 127.0.0.1, `python -m flows.serve`
serving a tiny project, and the serve app's own HTTP API (POST/GET /train) as the page uses it."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from signflow._capture import BURST_PATTERN, CaptureStore
from signflow.layout import STAGES
from tests.helpers import ROOT, make_project
from tests.test_capture import FAKE_RUN, captured_dataset
from tests.test_prefect_server import _client, _free_port, _stop, _try, _wait, prefect_server  # noqa: F401

DEPLOYMENT = "page-train"


def capture_project(tmp_path: Path, tiny_zip: Path, epochs: int) -> tuple[Path, Path]:
    """make_project's tiny project, splitting by burst, and a capture folder of 5 bursts a class."""
    project = make_project(tmp_path, tiny_zip, epochs=epochs)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"].update(
        train=0.6, valid=0.2, test=0.2, strategy="group", group_pattern=BURST_PATTERN, near_duplicates="off"
    )
    params["schedule"]["deployment"] = DEPLOYMENT
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    captures = captured_dataset(tmp_path / "captures", {"a": 5, "b": 5, "c": 5})
    return project, captures


def page(project: Path, captures: Path, api_url: str | None, command: list[str] | None = None):
    from fastapi.testclient import TestClient

    from signflow._page_training import PageTraining
    from signflow._prefect_run import PrefectServer
    from signflow.serve import ServedModel, create_app
    from tests.test_serving import AnsweringModel

    prefect = PrefectServer(api_url) if api_url else None
    training = PageTraining(project, captures, command, prefect=prefect)
    served = ServedModel(AnsweringModel(), "stand-in", None, ["a"], "stand-in")
    return TestClient(create_app(served, capture=CaptureStore(captures), training=training))


def follow(client, timeout: float = 420) -> tuple[dict, list[dict]]:
    """Poll GET /train as the page does until the run ends; every status seen, and the last."""
    seen, deadline = [], time.monotonic() + timeout
    while (status := client.get("/train").json())["state"] in ("queued", "running"):
        seen.append(status)
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    return status, seen


async def _read_run(url: str, run_id: str):
    async with _client(url) as client:
        return await client.read_flow_run(run_id)


@pytest.mark.slow
def test_train_runs_the_deployment_shows_step_and_epoch_refuses_a_second_and_says_why_one_failed(
    prefect_server,  # noqa: F811
    tmp_path,
    tiny_zip,
    monkeypatch,
):
    import signflow._page_training

    url, env = prefect_server
    monkeypatch.setattr(signflow._page_training, "POLL_S", 0.5)
    project, captures = capture_project(tmp_path, tiny_zip, epochs=12)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    # the run's log lines reach the API in batches (every 2 s by default): the tiny model's whole train
    # step can be shorter than that, so its epochs would reach the API only after the step had ended
    env["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.1"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--project-dir", str(project)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(lambda: _try(lambda: asyncio.run(_deployment(url))), 180, "the deployment", serve, log)
        with page(project, captures, url) as client:
            started = client.post("/train")
            assert started.status_code == 200, started.text
            run = started.json()["flow_run"]
            assert run["server"] == url and run["name"]
            flow_run = asyncio.run(_read_run(url, run["id"]))
            assert flow_run.name == run["name"] and "signflow-serve" in flow_run.tags, "a run of the deployment"
            assert flow_run.deployment_id is not None
            second = client.post("/train")
            assert second.status_code == 409 and run["name"] in second.json()["detail"], second.text

            final, seen = follow(client)
            assert final["state"] == "done", (final, log.read_text()[-4000:])
            assert final["flow_run"]["state"] == "Completed" and final["note"] is None, final
            assert final["flow_run"]["works_in"] == f"{project} on {socket.gethostname()}", "the run said where"
            print("statuses seen:", sorted({(s["flow_run"]["state"], s["step"] or "", s["epoch"] or 0) for s in seen}))
            trained = [s for s in seen if s["step"] == "train" and s["epoch"]]
            assert trained and all(1 <= s["epoch"] <= 12 and s["epochs"] == 12 for s in trained), seen
            steps = {s["step"] for s in seen}
            assert "train" in steps and steps <= {None, *STAGES, "push", "summary"}, steps  # the flow's tasks
            receipt = json.loads((project / "models" / "registered.json").read_text())
            assert receipt["version"] == "1", "the run registered the model trained on the captures"
            train_rows = (project / "data" / "split" / "train.csv").read_text()
            assert re.search(BURST_PATTERN, train_rows), "trained on the captured bursts, not the project's zip"

            for burst in sorted((captures / "b").glob("*_000.jpg"))[1:]:  # class b keeps one burst
                for frame in (captures / "b").glob(f"{burst.name[:32]}_*.jpg"):
                    frame.unlink()
            assert client.post("/train").status_code == 200
            failed, _ = follow(client)
            assert failed["state"] == "failed" and failed["flow_run"]["state"] == "Failed", failed
            print("failed:", failed["error"])
            assert failed["error"].startswith("class 'b' has"), failed["error"]
            assert "\n" not in failed["error"] and "Traceback" not in failed["error"]
            assert "Error:" not in failed["error"] and "encountered an exception" not in failed["error"]
        _stop(serve)  # the deployment stays, with nothing serving it: a new run waits, and is Late

        with page(project, captures, url) as client:
            assert client.post("/train").status_code == 200
            late = _wait(lambda: (s := client.get("/train").json())["flow_run"]["state"] == "Late" and s, 90, "Late")
            assert late["state"] == "queued" and late["step"] is None, late
            assert late["waiting"].startswith("Late: nothing has picked it up") and DEPLOYMENT in late["waiting"]
            refused = client.post("/train")
            assert refused.status_code == 409 and "Late" in refused.json()["detail"], refused.text
    finally:
        _stop(serve)


async def _deployment(url: str):
    async with _client(url) as client:
        return await client.read_deployment_by_name(f"signflow-pipeline/{DEPLOYMENT}")


@pytest.mark.slow
def test_without_the_deployment_train_runs_locally_and_says_so(prefect_server, tmp_path):  # noqa: F811
    from tests.test_capture import training_project

    url, _ = prefect_server
    project, release = training_project(tmp_path), tmp_path / "release"
    release.touch()
    command = [sys.executable, "-c", FAKE_RUN, str(release)]
    with page(project, tmp_path / "captures", url, command) as client:
        started = client.post("/train")
        assert started.status_code == 200, started.text
        assert started.json()["flow_run"] is None
        final, _ = follow(client, 60)
    assert final["state"] == "failed" and final["error"] == "the disk is full (models/model.pt)", "the local run"
    assert final["note"] == f"no deployment signflow-pipeline/scheduled on {url}: ran locally"


def test_a_prefect_server_that_cannot_be_reached_is_one_line_and_changes_nothing(tmp_path):
    from tests.test_capture import training_project

    project = training_project(tmp_path)
    url = f"http://user:secret@127.0.0.1:{_free_port()}/api"  # nothing listens there
    (project / "data.dvc").write_text("outs:\n- path: data/source\n")
    before = (project / "data.dvc").read_bytes()
    with page(project, tmp_path / "captures", url, [sys.executable, "-c", "pass"]) as client:
        answer = client.post("/train")
        status = client.get("/train").json()
    detail = answer.json()["detail"]
    assert answer.status_code == 503, detail
    assert detail.startswith("the Prefect server at http://***@127.0.0.1:") and "cannot be reached" in detail
    assert "unset PREFECT_API_URL to train locally" in detail and "\n" not in detail and "secret" not in detail
    assert status["state"] == "idle", "no local run instead"
    assert (project / "data.dvc").read_bytes() == before, "data.dvc untouched"


def test_a_run_that_works_in_another_checkout_is_said_to(tmp_path):
    from signflow._prefect_run import RunReport, other_project

    here = tmp_path / "project"
    report = RunReport("running", "Running", project=(str(here), socket.gethostname()))
    assert other_project(report, here) is None
    elsewhere = other_project(RunReport("running", "Running", project=("/srv/signflow", "gpu-box")), here)
    assert elsewhere.startswith(f"this run works in /srv/signflow on gpu-box, not in {here}")
    assert other_project(RunReport("queued", "Late"), here) is None, "nothing said before the run says where"


def test_a_busy_prefect_server_is_asked_again_and_a_failing_one_is_not(monkeypatch):
    """Prefect's server answers 503 while its SQLite database is locked (its scheduler writing): Train asks
    again, up to BUSY_RETRIES times, waiting Retry-After (at most 5 s); any other error is at once."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    import signflow._prefect_run as prefect_run

    waits = []
    monkeypatch.setattr(prefect_run.time, "sleep", waits.append)

    def answering(*codes: int):
        answers = iter(codes)

        def call():
            code = next(answers)
            if code == 200:
                return "created"
            request = httpx.Request("POST", "http://127.0.0.1:4200/api/deployments/x/create_flow_run")
            response = httpx.Response(code, headers={"Retry-After": "0.2"} if code == 503 else {}, request=request)
            raise PrefectHTTPStatusError.from_httpx_error(
                httpx.HTTPStatusError("busy", request=request, response=response)
            )

        return call

    assert prefect_run.while_busy(answering(503, 429, 200)) == "created"
    assert waits == [0.2, prefect_run.BUSY_WAIT_S]
    with pytest.raises(PrefectHTTPStatusError):
        prefect_run.while_busy(answering(500, 200))
    with pytest.raises(PrefectHTTPStatusError):
        prefect_run.while_busy(answering(*[503] * (prefect_run.BUSY_RETRIES + 1), 200))


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("0.2", 0.2),
        ("99", 5.0),
        ("-3", 0.0),
        ("inf", 5.0),
        ("nan", 1.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", 1.0),
        (None, 1.0),
    ],
)
def test_a_servers_retry_after_is_bounded_to_five_seconds_and_nonsense_waits_the_default(header, seconds):
    """Retry-After comes from the network: whatever it says, Train waits 0-5 s (time.sleep(nan) would raise)."""
    from signflow._prefect_run import BUSY_WAIT_S, _retry_after

    assert BUSY_WAIT_S == 1.0
    assert _retry_after(header) == seconds
