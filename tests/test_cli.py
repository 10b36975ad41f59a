import subprocess
import sys

import pytest
import yaml

from signflow.cli import COMMANDS, main
from tests.helpers import tiny_params


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--params" in capsys.readouterr().out


def test_bad_params_exit_2_with_the_key_and_no_traceback(tmp_path):
    raw = tiny_params()
    raw["train"]["epoch"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    run = subprocess.run([sys.executable, "-m", "signflow", "split"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2
    assert "train.epoch: unknown key" in run.stderr
    assert "Traceback" not in run.stderr


def test_runtime_error_exits_1_with_a_message(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    code = main(["extract", "--params", str(tmp_path / "params.yaml"), "--source", str(tmp_path / "missing")])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


def test_flow_cli_rejects_a_malformed_override():
    run = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--set", "train.epochs"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "expected KEY=VALUE" in run.stderr


def test_serve_refuses_a_bad_schedule_a_bad_override_and_a_missing_server(tmp_path, capsys, monkeypatch):
    from flows.serve import main as serve

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert serve(["--project-dir", str(tmp_path), "--cron", "99 * * * *"]) == 2
    assert "cron" in capsys.readouterr().err.lower()
    assert serve(["--project-dir", str(tmp_path), "--set", "train.epochz=3"]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err
    assert serve(["--project-dir", str(tmp_path), "--interval", "30"]) == 2
    assert "interval_s" in capsys.readouterr().err
    assert serve(["--project-dir", str(tmp_path)]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["set", "check"])
def test_source_commands_have_help(action, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["source", action, "--help"])
    assert exit_info.value.code == 0
    assert "--project-dir" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_a_registry_model_without_a_params_file_is_a_message(command, tmp_path, capsys):
    """`--model champion` needs register.model_name and the tracking URI from the params file."""
    from signflow import serve
    from signflow.config import ConfigError

    image = tmp_path / "a.png"
    image.write_bytes(b"")
    missing = tmp_path / "missing.yaml"
    if command == "predict":
        code = main(["predict", str(image), "--model", "champion", "--params", str(missing)])
        assert code != 0
        err = capsys.readouterr().err
    else:
        with pytest.raises(ConfigError) as error, serve.open_served_model("champion", missing):
            pass
        err = str(error.value)
    assert f"--model champion: a registry reference needs {missing}" in err and "Traceback" not in err


@pytest.mark.parametrize("batch_size", ["0", "-1", "many"])
def test_predict_refuses_a_batch_size_below_one_in_one_line(batch_size, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--batch-size", batch_size, "--model", str(tmp_path / "model.pt"), str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("signflow predict: error: argument --batch-size:")
    assert batch_size in err.splitlines()[-1] and "Traceback" not in err


def test_http_retries_are_not_logged_so_a_failing_command_says_one_line():
    """urllib3 logs a WARNING per retried request (MLflow's client retries a failing server); signflow reports
    the outcome in one line, so after the CLI configured logging, a retried request prints nothing."""
    probe = (
        "import requests; from requests.adapters import HTTPAdapter, Retry; from signflow.cli import main;"
        "main(['stack', 'status', '--dir', '/nonexistent/stack']);"
        "s = requests.Session(); s.mount('http://', HTTPAdapter(max_retries=Retry(total=1, backoff_factor=0)));"
        "s.get('http://127.0.0.1:9/')"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "ConnectionError" in done.stderr, done.stderr[-2000:]
    assert "Retrying" not in done.stderr
