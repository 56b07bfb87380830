"""`baton-site data add|list`: registration from the command line, errors as exit code 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typer.testing import CliRunner

from site_agent.cli import EXIT_BAD_INPUT, app
from tests.site_agent_tests.helpers import write_jsonl

runner = CliRunner()


def _notes(path: Path) -> Path:
    rows: list[dict[str, object]] = [
        {"text": f"note {label} {i}", "label": label} for label in ("a", "b") for i in range(10)
    ]
    return write_jsonl(path, rows)


def test_add_prints_counts_and_list_shows_them(tmp_path: Path) -> None:
    source = _notes(tmp_path / "notes.jsonl")

    added = runner.invoke(
        app,
        ["data", "add", "notes", str(source), "--task", "seq-classification",
         "--data-dir", str(tmp_path / "data"), "--seed", "2", "--option", "labels=a,b"],
    )  # fmt: skip
    listed = runner.invoke(app, ["data", "list", "--data-dir", str(tmp_path / "data")])
    as_json = runner.invoke(app, ["data", "list", "--data-dir", str(tmp_path / "data"), "--json"])

    assert added.exit_code == 0, added.output
    summary = json.loads(added.stdout)
    assert (summary["train"], summary["validation"], summary["test"]) == (12, 4, 4)
    assert summary["fingerprint"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert listed.exit_code == 0
    assert "notes" in listed.stdout and "seq-classification" in listed.stdout
    assert json.loads(as_json.stdout)[0]["counts"] == {"train": 12, "validation": 4, "test": 4}
    assert "note a" not in listed.stdout + as_json.stdout


def test_errors_exit_2_and_name_the_line(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "ok", "label": "a"}\n{"text": "no label"}\n')

    bad_file = runner.invoke(
        app,
        ["data", "add", "bad", str(source), "--task", "seq-classification",
         "--data-dir", str(tmp_path)],
    )  # fmt: skip
    bad_option = runner.invoke(
        app,
        ["data", "add", "bad", str(source), "--task", "seq-classification",
         "--data-dir", str(tmp_path), "--option", "dedupe"],
    )  # fmt: skip

    assert bad_file.exit_code == EXIT_BAD_INPUT
    assert f"{source}:2: missing 'label'" in bad_file.stderr
    assert bad_option.exit_code == EXIT_BAD_INPUT
    assert "--option must be key=value" in bad_option.stderr


def test_data_dir_can_come_from_the_environment(tmp_path: Path) -> None:
    source = _notes(tmp_path / "notes.jsonl")

    result = runner.invoke(
        app,
        ["data", "add", "notes", str(source), "--task", "seq-classification"],
        env={"BATON_SITE_DATA_DIR": str(tmp_path / "env-data")},
    )

    assert result.exit_code == 0, result.output
    assert (tmp_path / "env-data" / "notes" / "registration.json").is_file()


def test_model_hash_still_prints_the_base_model_hash(tiny_model_dir: Path) -> None:
    result = runner.invoke(app, ["model-hash", str(tiny_model_dir)])

    expected = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert result.stdout.strip() == expected
