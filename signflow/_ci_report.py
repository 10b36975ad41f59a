"""The Markdown report of `signflow ci`, rendered from its CiResult.

Two forms: the full report, with the two revisions' figures side by side as images next to it, and the
form for places that show only images at public URLs (GitHub's job summary, a pull request comment),
where each figure is named by its file beside the full report instead.
"""

from __future__ import annotations

import json
from typing import Any

from signflow import layout
from signflow._provenance import data_source, data_version
from signflow.ci import FIGURES, METRICS, CiResult, Revision

HEADLINE = (
    "accuracy",
    "macro_f1",
    "ece",
    "test_near_duplicates_in_train",
    "accuracy_without_near_duplicates",
    "test_images",
    "mistakes",
)
"""Metrics listed first; the others follow in DVC's order."""
CARD = layout.Workspace().outputs.model_card.as_posix()
RECEIPT = layout.Workspace().outputs.receipt.as_posix()


def render_report(result: CiResult, files_link: str, images: bool) -> str:
    """The report; `files_link` is the path from the report to the folder run_ci copied the revisions'
    files into; without `images`, each figure is named by its path there instead of shown."""
    base, head = result.base, result.head
    parts = [
        f"# signflow ci: {head.label} against {base.label}",
        f"**{'passed' if result.exit_code == 0 else 'failed'}**: {result.verdict.split(': ', 2)[-1]}",
        _timing(result),
        *[f"> **Note:** {note}" for note in result.notes],
        "## What changed",
        _params_section(result),
        _data_section(base, head),
        _code_section(result.code_changes),
        "## Stages",
        _stages_section(result),
        "## What it did to the model",
        *_model_sections(result, files_link, images),
        "## Verdict",
        *_verdict_section(result),
        result.verdict,
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def _timing(result: CiResult) -> str:
    repro = f" (`dvc repro --pull`: {result.repro_seconds:.0f} s)" if result.repro_seconds is not None else ""
    gates, fraction = result.gates, result.gates.max_test_near_duplicate_fraction
    near = f"at most {fraction:.1%} of the test images" if fraction else "no test image"
    return (
        f"Checked in {result.seconds:.0f} s{repro}. Gates, from the `ci:` params of {result.gates_from}: test "
        f"accuracy may fall by at most {gates.max_accuracy_drop:g}; {near} may have a near-duplicate in train."
    )


def _cell(value: Any, floats: str = "{:.4f}") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return floats.format(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _params_section(result: CiResult) -> str:
    rows = [
        f"| {_cell(key)} | {_cell(change.get('old'), '{}')} | {_cell(change.get('new'), '{}')} |"
        for changes in result.params_diff.values()
        for key, change in changes.items()
    ]
    title = f"### Params (`dvc params diff {result.base.sha[:7]}`)"
    if not rows:
        return f"{title}\n\nNo params changed."
    header = f"| param | {result.base.label} | {result.head.label} |\n|---|---|---|"
    return "\n".join([title, "", header, *rows])


def _data_section(base: Revision, head: Revision) -> str:
    def record(revision: Revision) -> tuple[str, str]:
        path = revision.files / "data.dvc"
        return data_source(path), data_version(path)

    (base_source, base_version), (source, version) = record(base), record(head)
    same = "unchanged" if (base_source, base_version) == (source, version) else "**changed**"
    return "\n".join(
        [
            f"### Data: {same}",
            "",
            f"| data.dvc | {base.label} | {head.label} |",
            "|---|---|---|",
            f"| source | `{base_source}` | `{source}` |",
            f"| version (DVC md5 of the fetched source) | `{base_version}` | `{version}` |",
        ]
    )


def _code_section(changes: list[str]) -> str:
    if not changes:
        return "### Code\n\nNo other file changed."
    shown = ", ".join(f"`{name}`" for name in changes[:30])
    more = f" and {len(changes) - 30} more" if len(changes) > 30 else ""
    return f"### Code\n\n{len(changes)} other file(s) changed: {shown}{more}."


def _stages_section(result: CiResult) -> str:
    if not result.stages:
        return "Not reproduced." if not result.reproduced else "Nothing to do: every stage was up to date."
    rows = [f"| {stage.stage} | {stage.outcome} |" for stage in result.stages]
    return "\n".join(["| stage | what `dvc repro --pull` did |", "|---|---|", *rows])


def _model_sections(result: CiResult, files_link: str, images: bool) -> list[str]:
    if not result.reproduced:
        return ["Not known: the pipeline was not reproduced (see the verdict below)."]
    return [
        _metrics_section(result),
        _comparison_line(result),
        _figures_section(result, files_link, images),
        _card_section(result.head),
    ]


def _metrics_section(result: CiResult) -> str:
    diff = result.metrics_diff.get(METRICS, {})
    keys = [key for key in HEADLINE if key in diff] + [key for key in diff if key not in HEADLINE]
    rows = [
        f"| {key} | {_cell(diff[key].get('old'))} | {_cell(diff[key].get('new'))} | {_cell(diff[key].get('diff'))} |"
        for key in keys
    ]
    splits = [_test_split(revision) for revision in (result.base, result.head)]
    rows.append(f"| how the test split was made | {_cell(splits[0])} | {_cell(splits[1])} | |")
    header = f"| metric | {result.base.label} | {result.head.label} | change |\n|---|---|---|---|"
    return "\n".join([f"### Metrics (`dvc metrics diff {result.base.sha[:7]} --all`)", "", header, *rows])


def _test_split(revision: Revision) -> str | None:
    text = revision.read(RECEIPT)
    return json.loads(text).get("test_split") if text else None


def _comparison_line(result: CiResult) -> str:
    comparison = result.comparison
    if comparison is None:
        return ""
    if comparison.base_accuracy is None:
        return f"Test accuracy not compared: {comparison.how}."
    return (
        f"Test accuracy: {comparison.base_accuracy:.4f} ({result.base.label}) against {comparison.accuracy:.4f} "
        f"({result.head.label}), on {comparison.how}."
    )


def _figures_section(result: CiResult, files_link: str, images: bool) -> str:
    header = f"| | {result.base.label} | {result.head.label} |\n|---|---|---|"
    rows = []
    for title, path in FIGURES.items():
        cells = [
            _figure(revision, path, f"{files_link}/{side}/{path}", title, images) for revision, side in _sides(result)
        ]
        rows.append(f"| {title} | {cells[0]} | {cells[1]} |")
    note = (
        ""
        if images
        else "\n\nThis page shows no images (GitHub renders only images at public URLs in job summaries and "
        "comments): the figures are beside the full report, `report.md` (in GitHub Actions: the `ci-report` artifact)."
    )
    return "\n".join(["### Figures", "", header, *rows]) + note


def _sides(result: CiResult) -> list[tuple[Revision, str]]:
    return [(result.base, "base"), (result.head, "head")]


def _figure(revision: Revision, path: str, link: str, title: str, images: bool) -> str:
    if not (revision.files / path).is_file():
        return f"not in {revision.label}"
    return f"![{title}, {revision.label}]({link})" if images else f"`{link}`"


def _card_section(head: Revision) -> str:
    card = head.read(CARD)
    if card is None:
        return "### Model card\n\nNo model card was written."
    return "\n".join(
        [
            "### Model card",
            "",
            f"<details><summary>{CARD} of {head.label}</summary>",
            "",
            _demoted(card),
            "",
            "</details>",
        ]
    )


def _demoted(markdown: str) -> str:
    """Headings two levels down, so the card's sit under the report's; code blocks left alone."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        lines.append(f"##{line}" if line.startswith("#") and not fenced else line)
    return "\n".join(lines)


def _verdict_section(result: CiResult) -> list[str]:
    if result.problem and result.output_tail:
        return ["The end of the pipeline's output:", "```text\n" + "\n".join(result.output_tail) + "\n```"]
    if result.failures:
        return ["\n".join(f"- {failure}" for failure in result.failures)]
    return []
