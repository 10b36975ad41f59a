import ast
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import BaseModel

from signflow import layout
from signflow.cli import COMMANDS, build_parser
from signflow.config import ConfigError, Params, check_run_overrides, load_params, parse_params
from tests.helpers import ROOT, tiny_params


def test_params_yaml_of_the_project_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.split.train + params.split.valid + params.split.test == pytest.approx(1.0)
    assert params.train.model


def test_unknown_key_names_its_full_path(tmp_path):
    raw = tiny_params()
    raw["train"]["augment"]["hflipp"] = 0.5
    with pytest.raises(ConfigError, match=r"train\.augment\.hflipp: unknown key"):
        parse_params(raw)


def test_wrong_type_and_missing_key_are_reported_together():
    raw = tiny_params()
    raw["train"]["epochs"] = "many"
    del raw["register"]["model_name"]
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert "train.epochs" in str(error.value)
    assert "register.model_name: required key is missing" in str(error.value)


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    raw = tiny_params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw).replace("lr: 0.003", "lr: 1e-4"))
    assert "1e-4" in path.read_text()
    assert load_params(path).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("split", "test", 0.5, "must be 1.0"),
        ("train", "lr", -0.1, "train.lr"),
        ("train", "trainable_blocks", -1, "train.trainable_blocks"),
        ("train", "trainable_blocks", "some", "train.trainable_blocks"),
        ("extract", "sha256", "abc", "extract.sha256"),
        ("split", "max_pixels", 10**9, "split.max_pixels"),
        ("split", "max_aspect_ratio", 0.5, "split.max_aspect_ratio"),
        ("train", "cache_dtype", "bfloat16", "train.cache_dtype"),
    ],
)
def test_out_of_range_values_are_refused(section, key, value, message):
    raw = tiny_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.seed", -1),
        ("train.seed", 2**32),
        ("split.seed", -1),
        ("split.seed", 2**32),
        ("train.num_threads", 20000),
    ],
)
def test_a_value_that_would_crash_or_abort_a_run_is_refused_at_load_time(tmp_path, key, value):
    section, name = key.split(".")
    raw = tiny_params()
    raw[section][name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Input should be"):
        load_params(path)


@pytest.mark.parametrize(("key", "value"), [("train.seed", -1), ("train.seed", 2**32), ("train.num_threads", 20000)])
def test_a_run_override_is_held_to_the_same_bounds(tmp_path, key, value):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params()))
    check_run_overrides({key: value})  # an allowed key: the value is what is refused
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Input should be"):
        load_params(path, {key: value})


def test_the_seed_bounds_are_the_ones_numpy_and_scikit_learn_take():
    from sklearn.utils import check_random_state

    raw = tiny_params()
    raw["train"]["seed"] = raw["split"]["seed"] = 2**32 - 1
    params = parse_params(raw)
    np.random.seed(params.train.seed)
    check_random_state(params.split.seed)
    raw["train"]["seed"] = raw["split"]["seed"] = 0
    params = parse_params(raw)
    np.random.seed(params.train.seed)
    check_random_state(params.split.seed)


def test_missing_params_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def _section_fields(section: str) -> set[str]:
    return set(Params.model_fields[section].annotation.model_fields)


def test_dvc_yaml_matches_params_and_cli():
    """Contract: every param a stage lists exists in the typed config, every cmd is a real command,
    and the stage's paths are the command's defaults (the Prefect flow uses the same defaults)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    parser = build_parser()
    for name, stage in dvc["stages"].items():
        for entry in stage.get("params", []):
            keys = [entry] if isinstance(entry, str) else [k for v in entry.values() for k in v]
            for key in keys:
                section, *rest = key.split(".")
                assert section in Params.model_fields, f"{name}: params key {key} is not in the config"
                if rest:
                    assert rest[0] in _section_fields(section), f"{name}: params key {key} is not in the config"
        words = stage["cmd"].split()
        assert words[:2] == ["signflow", name], f"stage {name} must run `signflow {name}`"
        assert name in COMMANDS
        defaults = vars(parser.parse_args(words[1:]))
        paths = {str(v) for v in defaults.values() if isinstance(v, Path)}
        declared = [d for d in stage.get("deps", []) if not d.startswith("signflow/")] + [
            next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage.get("metrics", [])
        ]
        for path in declared:
            assert any(path == p or path.startswith(p + "/") for p in paths), f"{name}: {path} is not a path it uses"


def test_every_setting_is_required_so_params_yaml_is_the_only_source_of_defaults():
    """No field has a default in code: a key missing from params.yaml is an error, never a silent default."""

    def optional_fields(model, prefix=""):
        for name, info in model.model_fields.items():
            if not info.is_required():
                yield f"{prefix}{name}"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from optional_fields(annotation, f"{prefix}{name}.")

    assert list(optional_fields(Params)) == []
    raw = tiny_params()
    del raw["train"]["label_smoothing"], raw["train"]["augment"]["hflip"]
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert "train.label_smoothing: required key is missing" in str(error.value)
    assert "train.augment.hflip: required key is missing" in str(error.value)


def _declared(stage: dict, kind: str) -> set[str]:
    return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(kind, [])}


def test_dvc_yaml_paths_are_the_layouts():
    """The stages' deps and outs are exactly the paths signflow.layout gives the steps."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    here = layout.Workspace()
    outputs = here.outputs
    reports = {str(path) for path in outputs.report_files()}
    assert {d for d in _declared(stages["extract"], "deps") if not d.startswith("signflow/")} == {str(here.source)}
    assert _declared(stages["extract"], "outs") == {str(here.raw)}
    assert _declared(stages["split"], "outs") == {str(here.split)}
    assert _declared(stages["train"], "outs") == {str(here.model), str(here.train_log)}
    assert _declared(stages["evaluate"], "outs") | _declared(stages["evaluate"], "metrics") == reports
    assert _declared(stages["export"], "outs") == {str(outputs.onnx)}
    assert _declared(stages["export"], "metrics") == {str(outputs.onnx.with_name("export.json"))}
    assert _declared(stages["register"], "outs") == {str(outputs.receipt), str(outputs.model_card)}
    assert {str(outputs.metrics), str(outputs.report_markdown), str(outputs.onnx)} <= _declared(
        stages["register"], "deps"
    )


def test_every_dvc_out_persists():
    """`dvc repro` deletes an out that does not persist before the stage's command runs: a failed step,
    or one stopped at another run's lock, would lose the last good output (the step itself replaces its
    outputs only once they are all written)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {
        f"{name}: {next(iter(entry)) if isinstance(entry, dict) else entry}": entry
        for name, stage in stages.items()
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
    }
    assert "train: models/model.pt" in outs and "evaluate: reports/metrics.json" in outs
    assert [out for out, entry in outs.items() if not (isinstance(entry, dict) and _flags(entry).get("persist"))] == []


def _flags(entry: dict) -> dict:
    return next(iter(entry.values())) or {}


PLUMBING = {"config", "errors", "layout", "cli", "__init__", "__main__"}
"""Shared plumbing no stage lists: validation (its values are params deps), paths, errors, the CLI."""


def _signflow_imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "signflow" / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "signflow":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("signflow."):
            found.add(node.module.split(".")[1])
    return found


def _code_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen and name not in PLUMBING:
            seen.add(name)
            todo += _signflow_imports(name)
    return {f"signflow/{name}.py" for name in seen}


def test_each_stage_depends_on_exactly_the_code_it_runs():
    """A code change reruns the stages whose code it touches and no other: each stage lists its step
    module and every signflow module that imports (at any depth), apart from the plumbing."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        code = {dep for dep in stages[stage]["deps"] if dep.startswith("signflow/")}
        assert code == _code_closure(stage), stage
        assert f"signflow/{stage}.py" in code and "signflow/cli.py" not in code


def test_each_step_has_one_name_everywhere():
    """A step's word names its module, its function, its DVC stage and command, its Prefect task and its
    params section: `git grep extract` finds them all."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    tasks_source = (ROOT / "tasks" / "pipeline.py").read_text(encoding="utf-8")
    assert tuple(stages) == layout.STAGES
    for stage in layout.STAGES:
        module_source = (ROOT / "signflow" / f"{stage}.py").read_text(encoding="utf-8")
        assert stages[stage]["cmd"] == f"signflow {stage}"
        assert stage in stages[stage]["params"] and stage in Params.model_fields
        assert f'@task(name="{stage}"' in tasks_source and f"def {stage}_task(" in tasks_source
        assert any(line.startswith(f"def {stage}") for line in module_source.splitlines()), stage


def test_signflow_modules_import_each_other_without_cycles():
    modules = {path.stem for path in (ROOT / "signflow").glob("*.py")}
    graph = {module: _signflow_imports(module) & modules for module in modules}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for imported in graph[module]:
                visit(imported, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_a_params_file_with_the_old_section_name_is_told_the_new_one(tmp_path):
    raw = tiny_params()
    raw["download"] = raw.pop("extract")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="download: this section is now called 'extract': rename it"):
        load_params(tmp_path / "params.yaml")
