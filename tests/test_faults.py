"""Faults leave the last good state intact: killed and interrupted runs, full disks, NaN losses,
concurrent registrations, and `dvc repro` stages that fail or stop at another run's lock."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from filelock import FileLock

from signflow._model_file import CheckpointError, load_bundle, save_bundle
from signflow._runners import PlainRunner
from signflow._training_state import resume_path
from signflow.config import parse_params
from signflow.evaluate import evaluate
from signflow.extract import extract_dataset
from signflow.fileio import remove_stale_scratch, remove_stale_scratch_in, sha256_file
from signflow.split import split_dataset
from signflow.train import TrainingError, train_model
from tests.helpers import CodeRunningPickle, make_project, section, tiny_params


@pytest.fixture
def prepared(tmp_path, tiny_zip):
    params = parse_params(tiny_params(epochs=4, cache_frozen_features=False))
    raw, split = tmp_path / "raw", tmp_path / "split"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, params.split)
    return params, raw, split


def _train(params, raw, split, out: Path):
    return train_model(params.train, raw, split, out / "model.pt", out / "log.csv")


def test_interrupted_training_resumes_from_its_checkpoint_to_the_same_model(prepared, tmp_path, monkeypatch):
    params, raw, split = prepared
    (tmp_path / "clean").mkdir()
    _train(params, raw, split, tmp_path / "clean")
    expected = load_bundle(tmp_path / "clean" / "model.pt").fingerprint()

    out = tmp_path / "interrupted"
    out.mkdir()
    original = PlainRunner.train_epoch

    def interrupt_at_epoch_3(self, optimizer, generator, epoch):
        if epoch == 3:
            raise KeyboardInterrupt("killed during epoch 3")
        return original(self, optimizer, generator, epoch)

    monkeypatch.setattr(PlainRunner, "train_epoch", interrupt_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _train(params, raw, split, out)
    assert resume_path(out / "model.pt").is_file() and not (out / "model.pt").exists()
    monkeypatch.setattr(PlainRunner, "train_epoch", original)
    result = _train(params, raw, split, out)
    assert result.epochs_run == 4
    assert load_bundle(out / "model.pt").fingerprint() == expected, "resumed run ends with the same weights"
    assert not resume_path(out / "model.pt").exists(), "the checkpoint is removed once training is done"


@pytest.mark.slow
def test_killed_training_process_resumes_to_the_same_model(prepared, tmp_path, venv_env):
    """SIGKILL the real `signflow train` as soon as its first epoch checkpoint exists, then rerun it."""
    params, raw, split = prepared
    project = tmp_path / "proj"
    project.mkdir()
    config = params.model_dump(mode="json")
    config["train"].update(epochs=6)
    (project / "params.yaml").write_text(yaml.safe_dump(config))
    command = ["signflow", "train", "--raw", str(raw), "--split", str(split)]
    clean = subprocess.run(
        [*command, "--model", "clean.pt", "--train-log", "clean.csv"], cwd=project, env=venv_env, capture_output=True
    )
    assert clean.returncode == 0, clean.stderr.decode()[-2000:]

    process = subprocess.Popen(command, cwd=project, env=venv_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = resume_path(project / "models" / "model.pt")
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if not checkpoint.exists():
        pytest.skip("training finished before it could be killed")
    assert not (project / "models" / "model.pt").exists()
    again = subprocess.run(command, cwd=project, env=venv_env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    assert load_bundle(project / "models" / "model.pt").fingerprint() == load_bundle(project / "clean.pt").fingerprint()


def test_a_checkpoint_from_other_params_is_not_resumed(prepared, tmp_path, monkeypatch, caplog):
    params, raw, split = prepared
    original = PlainRunner.train_epoch

    def interrupt(self, optimizer, generator, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, optimizer, generator, epoch)

    monkeypatch.setattr(PlainRunner, "train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train(params, raw, split, tmp_path)
    monkeypatch.setattr(PlainRunner, "train_epoch", original)
    other = params.train.model_copy(update={"lr": params.train.lr / 2})
    with caplog.at_level("WARNING"):
        result = train_model(other, raw, split, tmp_path / "model.pt", tmp_path / "log.csv")
    assert "made with other train params or data: not resumed" in caplog.text
    assert result.epochs_run == 4


def test_a_resume_checkpoint_that_would_run_code_is_not_loaded(prepared, tmp_path, caplog):
    """Anyone who can write models/ could plant `model.pt.resume`: it is read weights-only, so its
    pickle payload never runs, and training starts over."""
    params, raw, split = prepared
    marker = tmp_path / "code-ran"
    torch.save({"format": "signflow-resume-2", "payload": CodeRunningPickle(marker)}, resume_path(tmp_path / "m.pt"))
    with caplog.at_level("WARNING"):
        result = train_model(params.train, raw, split, tmp_path / "m.pt", tmp_path / "log.csv")
    assert not marker.exists()
    assert "unreadable or not a signflow checkpoint" in caplog.text
    assert result.epochs_run == params.train.epochs


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(prepared, tmp_path, monkeypatch):
    params, raw, split = prepared
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fail(obj, target, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _train(params, raw, split, tmp_path)
    checkpoint = torch.load(resume_path(tmp_path / "model.pt"), weights_only=True)
    assert checkpoint["state"]["epoch"] == 1, "the epoch-1 checkpoint survived the failed epoch-2 write"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _nan_loss_after(monkeypatch, batches: int) -> None:
    """Make the training loss NaN from the `batches`+1-th training batch on."""
    original = torch.nn.functional.cross_entropy
    seen = {"batches": 0}

    def nan_later(*args, **kwargs):
        loss = original(*args, **kwargs)
        if kwargs.get("label_smoothing") is None:
            return loss  # validation
        seen["batches"] += 1
        return loss * float("nan") if seen["batches"] > batches else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_later)


def test_nan_loss_stops_with_a_message_and_keeps_the_previous_model(prepared, tmp_path, monkeypatch):
    """A NaN in epoch 3 neither replaces the model of an earlier run nor writes a train log; a NaN in
    epoch 1 of a first run saves nothing at all."""
    params, raw, split = prepared
    _train(params, raw, split, tmp_path)
    previous = (tmp_path / "model.pt").read_bytes()
    log_before = (tmp_path / "log.csv").read_bytes()
    batches_per_epoch = -(-len(pd.read_csv(split / "train.csv")) // params.train.batch_size)
    _nan_loss_after(monkeypatch, 2 * batches_per_epoch + 1)
    with pytest.raises(TrainingError, match=f"epoch 3: loss became nan.*Nothing was saved: {tmp_path / 'model.pt'}"):
        _train(params, raw, split, tmp_path)
    assert (tmp_path / "model.pt").read_bytes() == previous
    assert (tmp_path / "log.csv").read_bytes() == log_before
    assert not resume_path(tmp_path / "model.pt").exists()

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.undo()
    _nan_loss_after(monkeypatch, 0)
    with pytest.raises(TrainingError, match="epoch 1: loss became nan.*Nothing was saved"):
        _train(params, raw, split, fresh)
    assert sorted(p.name for p in fresh.iterdir()) == []


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _files(folder: Path) -> dict[str, str]:
    """Every entry of `folder` (temporary files included) with the sha256 of its bytes."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_full_disk_while_saving_the_model_keeps_the_previous_model_and_its_log(prepared, tmp_path, monkeypatch):
    """The model and its epoch log change together: a write that fails leaves the previous pair, never
    a new log beside the old model, and no temporary file."""
    params, raw, split = prepared
    out = tmp_path / "out"
    out.mkdir()
    _train(params, raw, split, out)
    before = _files(out)
    real_save = torch.save

    def model_file_fails(obj, target, *args, **kwargs):
        if isinstance(obj, dict) and "format_version" in obj:
            _no_space()
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", model_file_fails)
    shorter = params.train.model_copy(update={"epochs": 2, "resume": False})
    with pytest.raises(OSError, match="No space left"):
        train_model(shorter, raw, split, out / "model.pt", out / "log.csv")
    assert _files(out) == before


def test_full_disk_while_drawing_the_report_keeps_the_whole_previous_report(trained, tmp_path, monkeypatch):
    """The disk fills while the last figure of another model's report is written: metrics, tables,
    figures and report.md all stay those of the previous evaluation, and no temporary file is left."""
    from matplotlib.figure import Figure

    params, raw, split, _ = trained
    reports = tmp_path / "reports"
    evaluate(params.evaluate, tmp_path / "model.pt", raw, split, reports, tmp_path / "train_log.csv")
    bundle = load_bundle(tmp_path / "model.pt")
    bundle.state_dict = {k: v * 1.5 if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    save_bundle(bundle, tmp_path / "other.pt")
    before = _files(reports)
    real_savefig, figures = Figure.savefig, []

    def last_figure_fails(figure, *args, **kwargs):
        figures.append(args[0])
        if len(figures) == 4:
            _no_space()
        return real_savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", last_figure_fails)
    with pytest.raises(OSError, match="No space left"):
        evaluate(params.evaluate, tmp_path / "other.pt", raw, split, reports, tmp_path / "train_log.csv")
    assert len(figures) == 4, "three figures were drawn before the disk filled"
    assert _files(reports) == before


def test_evaluate_refuses_a_model_whose_preprocessing_was_changed(trained, tmp_path):
    params, raw, split, _ = trained
    bundle = load_bundle(tmp_path / "model.pt")
    from dataclasses import replace

    bundle.preprocessing = replace(bundle.preprocessing, image_size=64)
    save_bundle(bundle, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="preprocessing does not match.*image size 64"):
        evaluate(section("evaluate"), tmp_path / "edited.pt", raw, split, tmp_path / "reports")


def _register_in_process(args):
    tracking, params_raw, model, accuracy, out = args
    from signflow.register import TEST_SET_TAG, Candidate, register_model

    params = parse_params({**params_raw, "register": {**params_raw["register"], "tracking_uri": tracking}})
    metrics = Path(out) / f"metrics-{accuracy}.json"
    metrics.write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy, "test_images": 9}))
    candidate = Candidate.from_files(model, metrics, params.model_dump(mode="json"), {TEST_SET_TAG: "same images"})
    result = register_model(params.register, candidate, Path(out) / f"rec-{accuracy}.json")
    return result.version, result.champion_version


def test_two_registrations_at_the_same_moment_make_two_versions_and_the_better_champion(trained, tmp_path):
    params, *_ = trained
    bundle = load_bundle(tmp_path / "model.pt")
    save_bundle(bundle, tmp_path / "a.pt")
    bundle.state_dict = {k: v + 1 if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    save_bundle(bundle, tmp_path / "b.pt")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = params.model_dump(mode="json")
    jobs = [
        (tracking, raw, str(tmp_path / "a.pt"), 0.7, str(tmp_path)),
        (tracking, raw, str(tmp_path / "b.pt"), 0.9, str(tmp_path)),
    ]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_register_in_process, jobs)
    assert sorted(version for version, _ in results) == ["1", "2"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    champion = client.get_model_version_by_alias(params.register.model_name, "champion")
    assert float(champion.tags["signflow.test_accuracy"]) == 0.9
    # A retried registration of the same weights adds nothing.
    again = _register_in_process((tracking, raw, str(tmp_path / "b.pt"), 0.9, str(tmp_path)))
    assert again[0] in {"1", "2"}
    assert len(client.search_model_versions(f"name = '{params.register.model_name}'")) == 2
    assert "MLFLOW_TRACKING_URI" not in os.environ, "registering must not redirect later processes' registry"


def _register_on_another_machine(args):
    """Register from a process with its own temp folder, as on another machine sharing the registry.
    "slow" stops right after its `dawdle_call`-th call of `register.<dawdle_in>` (after reading the
    champion, before moving the alias; after the duplicate check, before creating the version) until
    "fast", which starts only then, has begun its own registration, and 3 s more. Without a lock
    shared through the registry, "fast" reads the old champion (or finds no version of the same
    weights) and the two interleave."""
    role, scratch, tracking, params_raw, model, accuracy, (dawdle_in, dawdle_call) = args
    import tempfile

    os.environ["TMPDIR"] = str(Path(scratch) / role)
    Path(os.environ["TMPDIR"]).mkdir(exist_ok=True)
    tempfile.tempdir = None
    import signflow.register as register

    slow_waits, fast_started = Path(scratch) / "slow-is-dawdling", Path(scratch) / "fast-started"
    real, calls = getattr(register, dawdle_in), []
    if role == "fast":
        _wait_for(slow_waits, "the slow registration never reached the dawdle: no race tested")

    def dawdling(*call_args, **kwargs):
        calls.append(dawdle_in)
        answer = real(*call_args, **kwargs)
        if role == "slow" and len(calls) == dawdle_call:
            slow_waits.touch()
            _wait_for(fast_started, "the fast registration never started: no race tested")
            time.sleep(3)
        return answer

    setattr(register, dawdle_in, dawdling)
    params = parse_params({**params_raw, "register": {**params_raw["register"], "tracking_uri": tracking}})
    metrics = Path(scratch) / f"metrics-{role}.json"
    metrics.write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy, "test_images": 9}))
    tags = {register.TEST_SET_TAG: "same images"}
    candidate = register.Candidate.from_files(model, metrics, params.model_dump(mode="json"), tags)
    if role == "fast":
        fast_started.touch()
    result = register.register_model(params.register, candidate, Path(scratch) / f"rec-{role}.json")
    return result.version


def _wait_for(marker: Path, failure: str) -> None:
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), failure


def _race_two_machines(tmp_path, params, models: dict[str, Path], dawdle: tuple[str, int]) -> dict[str, str]:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow import MlflowClient

    MlflowClient(tracking).search_registered_models()  # the database exists before the two "machines" start
    raw = params.model_dump(mode="json")
    jobs = [
        ("slow", str(tmp_path), tracking, raw, str(models["slow"]), 0.7, dawdle),
        ("fast", str(tmp_path), tracking, raw, str(models["fast"]), 0.9, dawdle),
    ]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        return dict(zip(["slow", "fast"], pool.map(_register_on_another_machine, jobs), strict=True))


@pytest.mark.slow
def test_machines_sharing_a_registry_move_the_champion_one_at_a_time(trained, tmp_path):
    params, *_ = trained
    bundle = load_bundle(tmp_path / "model.pt")
    save_bundle(bundle, tmp_path / "slow.pt")
    bundle.state_dict = {k: v + 1 if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    save_bundle(bundle, tmp_path / "fast.pt")
    models = {"slow": tmp_path / "slow.pt", "fast": tmp_path / "fast.pt"}
    versions = _race_two_machines(tmp_path, params, models, ("_champion", 1))
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(params.register.model_name, "champion")
    assert str(champion.version) == versions["fast"], "the better model stays champion: no lost update"
    names = [m.name for m in client.search_registered_models()]
    assert names == [params.register.model_name], "the champion lock is gone once both finished"


@pytest.mark.slow
def test_machines_registering_the_same_weights_at_once_make_one_version(trained, tmp_path):
    params, *_ = trained
    models = {"slow": tmp_path / "model.pt", "fast": tmp_path / "model.pt"}
    versions = _race_two_machines(tmp_path, params, models, ("_find_version", 2))  # the check under the lock
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert versions == {"slow": "1", "fast": "1"}
    assert len(client.search_model_versions(f"name = '{params.register.model_name}'")) == 1
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "the run uploaded in vain is deleted"


def test_a_champion_lock_left_by_a_dead_registration_expires(trained, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    import signflow._mlflow as registry

    class Clock:  # time as champion_lock sees it: each wait moves it 100 s on, without real waiting
        now = 1_000_000.0

        def time(self) -> float:
            return self.now

        monotonic = time

        def sleep(self, seconds: float) -> None:
            self.now += 100

    params, *_ = trained
    clock = Clock()
    monkeypatch.setattr(registry, "time", clock)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = params.register.model_name + registry.CHAMPION_LOCK_SUFFIX
    expires = clock.now + 1000
    client.create_registered_model(name, tags={"holder": "dead", "expires": repr(expires)})
    with registry.champion_lock(client, params.register.model_name, timeout_s=5000):
        assert client.get_registered_model(name).tags["holder"] != "dead"
        assert clock.now > expires, "the dead holder's lock was kept until it expired"
    assert [m.name for m in client.search_registered_models()] == []


def _archive_slow_to_extract(tiny_zip: Path, target: Path, extra_files: int = 20000) -> Path:
    """The tiny dataset plus thousands of small notes beside it: extraction takes a while."""
    with zipfile.ZipFile(tiny_zip) as small, zipfile.ZipFile(target, "w") as big:
        for item in small.infolist():
            big.writestr(item, small.read(item))
        for index in range(extra_files):
            big.writestr(f"notes/note_{index:05d}.txt", "x")
    return target


def test_extract_killed_midway_leaves_the_previous_dataset_and_the_next_run_starts_clean(tmp_path, tiny_zip, venv_env):
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    extract_dataset(tiny_zip, project / "data" / "raw", section("extract"))
    before = sorted(p.relative_to(project).as_posix() for p in (project / "data" / "raw").rglob("*"))
    _archive_slow_to_extract(tiny_zip, project / "data" / "source")
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    process = subprocess.Popen(
        ["signflow", "extract"], cwd=project, env=venv_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline and not partial and process.poll() is None:
        partial = [p for p in (project / "data").iterdir() if p.name.endswith(".partial") and any(p.rglob("*"))]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial, "the extraction had started"
    after = sorted(p.relative_to(project).as_posix() for p in (project / "data" / "raw").rglob("*"))
    assert after == before, "a killed extraction leaves the previous dataset untouched"
    extract_dataset(project / "data" / "source", project / "data" / "raw", section("extract"))
    assert not [p for p in (project / "data").iterdir() if p.name.endswith(".partial")], "stale scratch removed"


def test_stale_scratch_of_a_live_process_is_kept(tmp_path):
    from signflow.fileio import _host_tag

    target = tmp_path / "raw"
    mine = tmp_path / f".raw.{_host_tag()}-{os.getpid()}.abc.partial"
    dead = tmp_path / f".raw.{_host_tag()}-999999999.abc.partial"
    legacy_dead = tmp_path / ".raw.999999999.def.partial"  # named before hosts were recorded
    for folder in (mine, dead, legacy_dead):
        folder.mkdir()
    assert sorted(remove_stale_scratch(target)) == sorted([dead, legacy_dead])
    assert mine.exists() and not dead.exists()


def test_a_killed_override_runs_scratch_is_removed_whatever_its_run_id_and_a_live_ones_is_kept(tmp_path):
    """Override runs stage in `runs/.<run id>.<host>-<pid>.<random>.partial`: the next run has another
    run id, so it must look for every run's scratch, not only its own name's."""
    from signflow.fileio import _host_tag

    runs, here = tmp_path / "runs", _host_tag()
    dead = runs / f".3f2a-run-a.{here}-999999999.k1.partial"
    live = runs / f".9c1b-run-b.{here}-{os.getpid()}.k2.partial"
    other_host_fresh = runs / ".77aa-run-c.other-box-999999999.k3.partial"
    other_host_old = runs / ".88bb-run-d.other-box-999999998.k4.partial"
    finished = runs / "5d4e-run-e"  # a finished override run's workspace
    for folder in (dead, live, other_host_fresh, other_host_old, finished):
        (folder / "workspace" / "data" / "raw").mkdir(parents=True)
        (folder / "workspace" / "data" / "raw" / "big.bin").write_bytes(b"x" * 1000)
    day_and_a_bit = time.time() - 25 * 3600
    os.utime(other_host_old, (day_and_a_bit, day_and_a_bit))
    assert sorted(remove_stale_scratch_in(runs)) == sorted([dead, other_host_old])
    assert sorted(p.name for p in runs.iterdir()) == sorted(p.name for p in (live, other_host_fresh, finished))
    assert remove_stale_scratch_in(tmp_path / "no-runs-yet") == []


def test_scratch_of_another_host_is_kept_until_it_is_a_day_old(tmp_path):
    """Containers sharing a folder have their own process ids: a pid that is dead here may be alive
    there, so another host's scratch is only removed once it has been untouched for a day."""
    target = tmp_path / "model.pt"
    fresh = tmp_path / ".model.pt.other-box-999999999.abc.tmp"
    old = tmp_path / ".model.pt.other-box-999999998.def.tmp"
    fresh.write_text("being written on another host")
    old.write_text("left by a crash long ago")
    day_and_a_bit = time.time() - 25 * 3600
    os.utime(old, (day_and_a_bit, day_and_a_bit))
    assert remove_stale_scratch(target) == [old]
    assert fresh.exists()


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path):
    """mkstemp/mkdtemp create 0600/0700 files: atomic writes must give the umask's mode to new files
    and folders and keep an existing file's own mode, so other users (an MLflow server) can read them."""
    import stat

    from signflow.fileio import staging_dir, write_text_atomic

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "new.md", "x")
        assert mode(tmp_path / "new.md") == 0o644
        (tmp_path / "kept.md").write_text("old")
        os.chmod(tmp_path / "kept.md", 0o640)
        write_text_atomic(tmp_path / "kept.md", "new")
        assert mode(tmp_path / "kept.md") == 0o640
        with staging_dir(tmp_path / "dataset") as staged:
            assert mode(staged) == 0o755
    finally:
        os.umask(previous)


def test_image_size_the_model_cannot_take_is_a_config_error(prepared, tmp_path):
    params, raw, split = prepared
    from signflow.config import ConfigError

    cfg = params.train.model_copy(update={"model": "vit_tiny_patch16_224", "image_size": 100})
    with pytest.raises(ConfigError, match="train.image_size: 100 px is not supported by vit_tiny_patch16_224"):
        train_model(cfg, raw, split, tmp_path / "model.pt", tmp_path / "log.csv")


def _dvc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)


def _set_param(project: Path, section_name: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section_name][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _contents(project: Path, *outputs: str) -> dict[str, str]:
    """Every file of the given outputs (files or folders), by path, with the sha256 of its bytes."""
    files = {}
    for output in outputs:
        path = project / output
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[file.relative_to(project).as_posix()] = sha256_file(file)
    return files


@pytest.mark.slow
def test_a_train_failing_under_dvc_repro_keeps_the_previous_model_and_log(tmp_path, tiny_zip, venv_env):
    """DVC removes a stage's outputs before its command unless they persist: a train that fails (here a
    missing weights file) must leave the last model and its epoch log (not cached: no `dvc checkout`
    could bring it back), and dvc.lock still describes them once the param is set back."""
    project = make_project(tmp_path, tiny_zip, epochs=1)
    first = _dvc(project, venv_env, "repro", "train")
    assert first.returncode == 0, first.stdout + first.stderr
    before = _contents(project, "models/model.pt", "reports/train_log.csv")
    _set_param(project, "train", "weights_file", "no-such-weights.safetensors")
    failed = _dvc(project, venv_env, "repro", "train")
    assert failed.returncode != 0 and "no-such-weights.safetensors does not exist" in failed.stdout + failed.stderr
    assert _contents(project, "models/model.pt", "reports/train_log.csv") == before
    _set_param(project, "train", "weights_file", None)
    status = _dvc(project, venv_env, "status", "train", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout


def test_an_extract_failing_under_dvc_repro_keeps_the_previous_dataset(tmp_path, tiny_zip, venv_env):
    project = make_project(tmp_path, tiny_zip)
    first = _dvc(project, venv_env, "repro", "extract")
    assert first.returncode == 0, first.stdout + first.stderr
    before = _contents(project, "data/raw")
    _set_param(project, "extract", "sha256", "0" * 64)
    failed = _dvc(project, venv_env, "repro", "extract")
    assert failed.returncode != 0 and "extract.sha256 expects 0000" in failed.stdout + failed.stderr
    assert before and _contents(project, "data/raw") == before


def test_dvc_repro_stopped_by_another_run_leaves_that_runs_outputs_alone(tmp_path, tiny_zip, venv_env):
    """While a flow run or a sweep holds the run lock, `dvc repro split` stops at the lock, and must not
    have removed data/split first; run again once the lock is free, it splits and records the split."""
    project = make_project(tmp_path, tiny_zip)
    first = _dvc(project, venv_env, "repro", "split")
    assert first.returncode == 0, first.stdout + first.stderr
    before = _contents(project, "data/split")
    _set_param(project, "split", "seed", 7)
    lock = FileLock(str(project / ".signflow-run.lock"))
    lock.acquire(timeout=0)
    try:
        stopped = _dvc(project, venv_env, "repro", "split")
    finally:
        lock.release()
    assert stopped.returncode != 0 and "`dvc repro` stops at this stage" in stopped.stdout + stopped.stderr
    assert before and _contents(project, "data/split") == before
    again = _dvc(project, venv_env, "repro", "split")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _contents(project, "data/split") != before
    assert json.loads(_dvc(project, venv_env, "status", "split", "--json").stdout) == {}
