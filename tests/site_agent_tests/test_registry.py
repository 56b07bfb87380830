"""Registering a site's data: validation, fingerprint, seeded stratified splits, aggregate lists."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from site_agent.examples import InstructionExample, TabularExample, TextExample
from site_agent.loaders import SourceRows
from site_agent.registry import (
    REGISTRATION_FILE,
    DatasetError,
    list_registered,
    load_registered,
    register_dataset,
)
from tests.site_agent_tests.helpers import instruction_rows, write_jsonl


def _text_rows(counts: dict[str, int]) -> list[dict[str, object]]:
    return [
        {"text": f"note {label} {index}", "label": label}
        for label, count in counts.items()
        for index in range(count)
    ]


def test_split_is_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 50, "b": 20, "c": 10}))

    first = register_dataset(tmp_path / "data", "notes", source, task_type="seq-classification")
    again = load_registered(tmp_path / "data", "notes")
    other_dir = register_dataset(
        tmp_path / "elsewhere", "n", source, task_type="seq-classification"
    )

    assert again == first
    assert (other_dir.train, other_dir.validation, other_dir.test) == (
        first.train, first.validation, first.test,
    )  # fmt: skip
    assert Counter(e.label for e in first.test) == {"a": 10, "b": 4, "c": 2}
    assert Counter(e.label for e in first.validation) == {"a": 10, "b": 4, "c": 2}
    assert Counter(e.label for e in first.train) == {"a": 30, "b": 12, "c": 6}
    splits = [set(first.train), set(first.validation), set(first.test)]
    assert all(a.isdisjoint(b) for i, a in enumerate(splits) for b in splits[i + 1 :])
    assert first.labels == ("a", "b", "c")
    assert first.fingerprint == hashlib.sha256(source.read_bytes()).hexdigest()


def test_split_depends_on_the_seed_but_not_on_other_labels(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 50, "b": 50}))
    more = write_jsonl(tmp_path / "more.jsonl", _text_rows({"a": 50, "b": 50, "c": 7}))

    one = register_dataset(tmp_path / "d", "one", source, task_type="seq-classification", seed=1)
    other = register_dataset(tmp_path / "d", "two", source, task_type="seq-classification", seed=2)
    extra = register_dataset(tmp_path / "d", "three", more, task_type="seq-classification", seed=1)

    assert set(one.test) != set(other.test)
    assert Counter(e.label for e in one.test) == Counter(e.label for e in other.test)
    assert {e for e in extra.test if e.label != "c"} == set(one.test)


def test_small_labels_keep_a_training_row(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "n.jsonl", _text_rows({"common": 30, "pair": 2, "single": 1}))

    dataset = register_dataset(tmp_path / "d", "n", source, task_type="seq-classification")

    train = Counter(e.label for e in dataset.train)
    assert train["single"] == 1
    assert train["pair"] == 1


def test_registration_records_counts_and_row_indices_but_never_copies_data(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 10, "b": 10}))

    register_dataset(
        tmp_path / "data", "notes", source, task_type="seq-classification", seed=4,
        validation_fraction=0.3, test_fraction=0.1,
    )  # fmt: skip

    assert [p.name for p in (tmp_path / "data" / "notes").iterdir()] == [REGISTRATION_FILE]
    registration = json.loads((tmp_path / "data" / "notes" / REGISTRATION_FILE).read_text())
    assert registration["source"] == str(source.resolve())
    assert registration["format"] == "jsonl"
    assert registration["seed"] == 4
    assert registration["counts"] == {"train": 12, "validation": 6, "test": 2}
    assert registration["label_counts"]["test"] == {"a": 1, "b": 1}
    assert sorted(i for indices in registration["split"].values() for i in indices) == list(
        range(20)
    )
    assert "note a 0" not in json.dumps(registration)


@pytest.mark.parametrize(
    ("task_type", "rows", "expected"),
    [
        ("causal-lm", instruction_rows(10), InstructionExample),
        ("tabular", [{"features": [1, 2.5], "label": i % 2} for i in range(10)], TabularExample),
        ("seq-classification", _text_rows({"x": 5, "y": 5}), TextExample),
    ],
)
def test_each_task_type_registers_from_json_lines(
    tmp_path: Path, task_type: str, rows: list[dict[str, object]], expected: type
) -> None:
    source = write_jsonl(tmp_path / "rows.jsonl", rows)

    dataset = register_dataset(tmp_path / "d", "rows", source, task_type=task_type)

    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 10
    assert all(isinstance(e, expected) for e in (*dataset.train, *dataset.test))
    assert dataset.task_type == task_type
    if task_type == "tabular":
        assert dataset.feature_names == ("x0", "x1")
        assert dataset.labels == ("0", "1")
    if task_type == "causal-lm":
        assert dataset.labels == ()


JSONL_CASES = [
    ("seq-classification", '{"text": "cough", "label": ', "invalid JSON"),
    ("seq-classification", '["cough", "respiratory"]', "expected a JSON object"),
    ("seq-classification", '{"label": "respiratory"}', "missing 'text'"),
    ("seq-classification", '{"text": "   ", "label": "respiratory"}', "'text' is empty"),
    ("seq-classification", '{"text": 3, "label": "respiratory"}', "'text' must be a string"),
    ("seq-classification", '{"text": "cough"}', "missing 'label'"),
    ("seq-classification", '{"text": "cough", "label": "renal"}', "label 'renal' is not one of"),
    ("causal-lm", '{"instruction": "why?", "response": ""}', "'response' is empty"),
    ("causal-lm", '{"instruction": "why?"}', "missing 'response'"),
    ("tabular", '{"features": [1, "x"], "label": "1"}', "feature 1 is not a number"),
    ("tabular", '{"features": [1], "label": "1"}', "'features' has 1 values; earlier rows have 2"),
    ("tabular", '{"features": [1, 2], "label": true}', "'label' must be a non-empty string"),
]
GOOD_LINES = {
    "seq-classification": '{"text": "chest pain", "label": "cardiac"}',
    "causal-lm": '{"instruction": "why?", "response": "because"}',
    "tabular": '{"features": [0.5, 1], "label": "cardiac"}',
}


@pytest.mark.parametrize(("task_type", "bad_line", "reason"), JSONL_CASES)
def test_malformed_line_error_names_the_file_and_line(
    tmp_path: Path, task_type: str, bad_line: str, reason: str
) -> None:
    source = tmp_path / "site.jsonl"
    good = GOOD_LINES[task_type]
    # A blank line still counts towards the line number.
    source.write_text(f"{good}\n\n{bad_line}\n{good.replace('0.5', '0.7')}\n", encoding="utf-8")

    with pytest.raises(DatasetError, match=reason) as raised:
        register_dataset(
            tmp_path / "d", "site", source, task_type=task_type,
            options={"labels": "cardiac,respiratory"} if task_type != "causal-lm" else {},
        )  # fmt: skip

    assert f"{source}:3:" in str(raised.value)
    assert not (tmp_path / "d" / "site").exists()


@pytest.mark.parametrize(
    ("content", "reason", "line"),
    [
        ("a,b,label\n1,2,x\n1,,y\n", "empty value in column 'b'", 3),
        ("a,b,label\n1,2,x\n1,2\n", "2 fields, the header has 3", 3),
        ("a,b,label\n1,2,x\n1,two,y\n", "column 'b' is not a number", 3),
        ("a,b\n1,2\n", "header has no label column 'label'", 1),
        ("a,b,label\n1,2,x\n1,inf,y\n", "column 'b' is not finite", 3),
    ],
)
def test_malformed_csv_error_names_the_line(
    tmp_path: Path, content: str, reason: str, line: int
) -> None:
    source = tmp_path / "rows.csv"
    source.write_text(content)

    with pytest.raises(DatasetError, match=reason) as raised:
        register_dataset(tmp_path / "d", "rows", source, task_type="tabular")

    assert f"{source}:{line}:" in str(raised.value)


def test_csv_registers_named_features_and_a_chosen_label_column(tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    source.write_text("age,outcome,bmi\n" + "".join(f"{i},{i % 2},{i / 10}\n" for i in range(10)))

    dataset = register_dataset(
        tmp_path / "d", "rows", source, task_type="tabular", options={"label_column": "outcome"}
    )

    assert dataset.feature_names == ("age", "bmi")
    assert all(len(e.features) == 2 for e in dataset.train)


def test_duplicate_rows_are_refused_naming_both_lines_unless_deduplicated(tmp_path: Path) -> None:
    rows = _text_rows({"a": 6, "b": 6})
    rows.insert(5, dict(rows[1]))
    source = write_jsonl(tmp_path / "notes.jsonl", rows)

    with pytest.raises(DatasetError, match=r"notes.jsonl:6: duplicate of line 2"):
        register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    dataset = register_dataset(
        tmp_path / "d", "notes", source, task_type="seq-classification",
        options={"dedupe": "true"},
    )  # fmt: skip

    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 12
    registration = json.loads((tmp_path / "d" / "notes" / REGISTRATION_FILE).read_text())
    assert registration["details"]["dropped_duplicates"] == 1


def test_tabular_keeps_repeated_rows(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [{"features": [1.0], "label": "1"}] * 4
    rows += [{"features": [0.0], "label": "0"}] * 4
    source = write_jsonl(tmp_path / "rows.jsonl", rows)

    dataset = register_dataset(tmp_path / "d", "rows", source, task_type="tabular")

    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 8


def test_empty_file_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    good = write_jsonl(tmp_path / "ok.jsonl", _text_rows({"a": 4}))

    with pytest.raises(DatasetError, match="empty") as raised:
        register_dataset(tmp_path / "d", "e", empty, task_type="seq-classification")
    assert str(empty) in str(raised.value)
    with pytest.raises(DatasetError, match="cannot read"):
        register_dataset(tmp_path / "d", "m", tmp_path / "missing.jsonl", task_type="causal-lm")
    with pytest.raises(DatasetError, match="dataset name"):
        register_dataset(tmp_path / "d", "../escape", good, task_type="seq-classification")
    with pytest.raises(DatasetError, match="unknown task type"):
        register_dataset(tmp_path / "d", "x", good, task_type="segmentation")
    with pytest.raises(DatasetError, match=r"unknown option\(s\) \['dedup'\]"):
        register_dataset(
            tmp_path / "d", "x", good, task_type="seq-classification", options={"dedup": "true"}
        )
    with pytest.raises(DatasetError, match="must leave rows for training"):
        register_dataset(
            tmp_path / "d", "x", good, task_type="seq-classification",
            validation_fraction=0.5, test_fraction=0.5,
        )  # fmt: skip
    with pytest.raises(DatasetError, match="cannot tell the format"):
        register_dataset(tmp_path / "d", "x", tmp_path / "rows.txt", task_type="tabular")


def test_undecodable_file_is_refused(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "fi\xe8vre", "label": "a"}\n'.encode("latin-1"))

    with pytest.raises(DatasetError, match=r"latin1.jsonl: not valid UTF-8 \(byte 12\)"):
        register_dataset(tmp_path / "d", "l", latin1, task_type="seq-classification")


def test_existing_name_is_refused_unless_replaced(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 5, "b": 5}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")

    with pytest.raises(DatasetError, match="already registered"):
        register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification", seed=3)
    replaced = register_dataset(
        tmp_path / "d", "notes", source, task_type="seq-classification", seed=3, replace=True
    )

    assert load_registered(tmp_path / "d", "notes") == replaced


def test_changed_source_is_refused_at_load(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 5, "b": 5}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")

    write_jsonl(source, _text_rows({"a": 5, "b": 6}))

    with pytest.raises(DatasetError, match="changed since dataset 'notes' was registered"):
        load_registered(tmp_path / "d", "notes")
    with pytest.raises(DatasetError, match="no dataset named 'other'"):
        load_registered(tmp_path / "d", "other")
    assert list_registered(tmp_path / "d")[0]["status"] == "changed"


def _counting_parses(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the source parses `load_registered` makes (their paths)."""
    import site_agent.loaders as loaders  # the registry imports its parser when it parses

    parsed: list[Path] = []
    real = loaders.parse_source

    def parse_source(data: bytes, *, path: Path, **kwargs: Any) -> SourceRows:
        parsed.append(path)
        return real(data, path=path, **kwargs)

    monkeypatch.setattr(loaders, "parse_source", parse_source)
    return parsed


def test_loading_again_reuses_the_parsed_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 8, "b": 8}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    parsed = _counting_parses(monkeypatch)

    first = load_registered(tmp_path / "d", "notes")
    again = load_registered(tmp_path / "d", "notes")

    assert again is first
    assert parsed == [source.resolve()]


def test_a_changed_source_is_refused_after_a_cached_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 5, "b": 5}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    load_registered(tmp_path / "d", "notes")
    parsed = _counting_parses(monkeypatch)

    write_jsonl(source, _text_rows({"a": 5, "b": 6}))  # same size class, other bytes

    with pytest.raises(DatasetError, match="changed since dataset 'notes' was registered"):
        load_registered(tmp_path / "d", "notes")
    assert parsed == []
    # Put back byte for byte, the registered file is the cached one again.
    write_jsonl(source, _text_rows({"a": 5, "b": 5}))
    assert len(load_registered(tmp_path / "d", "notes").train) == 6
    assert parsed == []


def test_a_registration_written_again_is_parsed_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 30, "b": 30}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification", seed=1)
    before = load_registered(tmp_path / "d", "notes")
    replaced = register_dataset(
        tmp_path / "d", "notes", source, task_type="seq-classification", seed=2, replace=True
    )
    parsed = _counting_parses(monkeypatch)

    after = load_registered(tmp_path / "d", "notes")

    assert after == replaced and after.seed == 2
    assert after.train != before.train
    assert parsed == [source.resolve()]


def test_a_rewritten_legacy_file_is_not_served_from_the_cache(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "triage.jsonl", _text_rows({"a": 10, "b": 10}))
    assert len(load_registered(tmp_path, "triage").train) == 12

    write_jsonl(tmp_path / "triage.jsonl", _text_rows({"a": 10, "b": 12}))

    assert len(load_registered(tmp_path, "triage").train) == 13


def test_legacy_jsonl_files_are_registered_on_first_use(tmp_path: Path) -> None:
    rows = _text_rows({"a": 10, "b": 10})
    rows.append(dict(rows[0]))  # the demo's generator can repeat a note
    write_jsonl(tmp_path / "triage.jsonl", rows)

    dataset = load_registered(tmp_path, "triage")

    assert dataset.task_type == "seq-classification"
    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 20
    assert (tmp_path / "triage" / REGISTRATION_FILE).is_file()
    # The demo may rewrite its file: an automatic registration follows it.
    write_jsonl(tmp_path / "triage.jsonl", _text_rows({"a": 10, "b": 12}))
    assert list_registered(tmp_path)[0]["counts"] == {"train": 13, "validation": 5, "test": 4}
    assert len(load_registered(tmp_path, "triage").train) == 13


def test_list_shows_aggregate_counts_only(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "legacy.jsonl", _text_rows({"a": 5, "b": 5}))
    source = write_jsonl(tmp_path / "pairs.jsonl", instruction_rows(10))
    register_dataset(tmp_path, "pairs", source, task_type="causal-lm")

    listed = list_registered(tmp_path)

    assert [entry["name"] for entry in listed] == ["legacy", "pairs"]
    assert listed[0]["counts"] == {"train": 6, "validation": 2, "test": 2}
    assert listed[0]["label_counts"] == {
        "train": {"a": 3, "b": 3}, "validation": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1},
    }  # fmt: skip
    assert listed[1]["status"] == "ok"
    text = json.dumps(listed)
    assert "note a" not in text and "patient" not in text
    assert str(tmp_path) not in text
    assert list_registered(tmp_path / "missing") == []


def test_registry_does_not_import_torch() -> None:
    code = "import sys, site_agent.registry; assert 'torch' not in sys.modules"

    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_site_start_registers_and_lists_text_data_without_loading_numpy(tmp_path: Path) -> None:
    # What a site does before its first hello: register the legacy `<name>.jsonl` the demo
    # writes and list it. numpy (~0.2 s of CPU) is only FLamby's heart-disease split's.
    write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 20, "b": 20}))
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from site_agent.registry import list_registered\n"
        f"listed = list_registered(Path({str(tmp_path)!r}))\n"
        "assert [entry['status'] for entry in listed] == ['ok'], listed\n"
        "assert 'numpy' not in sys.modules, 'registering text data imported numpy'\n"
    )

    subprocess.run([sys.executable, "-c", code], check=True)


def _counting_calls(monkeypatch: pytest.MonkeyPatch, function: str) -> list[Path]:
    """The paths `registry.<function>` is called with from now on (it still runs)."""
    from site_agent import registry

    called: list[Path] = []
    real = getattr(registry, function)

    def counted(path: Path) -> object:
        called.append(path)
        return real(path)

    monkeypatch.setattr(registry, function, counted)
    return called


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the source reads (and so hashes) `load_registered` makes."""
    return _counting_calls(monkeypatch, "_read_bytes")


def _settled_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source counts as settled as soon as it is written (the tests cannot wait seconds)."""
    from site_agent import registry

    monkeypatch.setattr(registry, "_RECENT_CHANGE_NS", 0)


def test_a_settled_source_is_not_hashed_again_while_its_identity_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settled_at_once(monkeypatch)
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 8, "b": 8}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    reads = _counting_reads(monkeypatch)

    first = load_registered(tmp_path / "d", "notes")
    again = load_registered(tmp_path / "d", "notes")

    assert again is first
    assert reads == [source.resolve()]  # hashed once; the second load compared its identity
    # A preparation's load hashes it in full all the same.
    assert load_registered(tmp_path / "d", "notes", rehash=True) is first
    assert len(reads) == 2


def test_a_same_size_edit_with_its_mtime_put_back_is_refused_after_a_vouched_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    _settled_at_once(monkeypatch)
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 5, "b": 5}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    load_registered(tmp_path / "d", "notes")
    load_registered(tmp_path / "d", "notes")  # served on its identity
    before = source.stat()

    edited = source.read_bytes().replace(b"note a 0", b"note b 0", 1)
    assert len(edited) == before.st_size
    source.write_bytes(edited)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were

    with pytest.raises(DatasetError, match="changed since dataset 'notes' was registered"):
        load_registered(tmp_path / "d", "notes")


def test_a_source_replaced_by_another_file_is_refused_after_a_vouched_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settled_at_once(monkeypatch)
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 5, "b": 5}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    load_registered(tmp_path / "d", "notes")
    load_registered(tmp_path / "d", "notes")

    other = write_jsonl(tmp_path / "other.jsonl", _text_rows({"a": 5, "c": 5}))
    other.replace(source)

    with pytest.raises(DatasetError, match="changed since dataset 'notes' was registered"):
        load_registered(tmp_path / "d", "notes")


def test_a_source_changed_moments_ago_is_hashed_at_every_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 8, "b": 8}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    reads = _counting_reads(monkeypatch)

    for _ in range(3):
        load_registered(tmp_path / "d", "notes")

    # Written within `_RECENT_CHANGE_NS`: a change in the same timestamp tick would not show in
    # its identity, so only a hash can tell.
    assert reads == [source.resolve()] * 3


def test_a_change_its_identity_hides_is_caught_by_a_preparations_full_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from site_agent import registry

    _settled_at_once(monkeypatch)
    # What a filesystem that keeps no timestamps (or a same-tick change) looks like.
    monkeypatch.setattr(registry, "_source_identity", lambda path: (1, 2, 3, 4, 5))
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 5, "b": 5}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    load_registered(tmp_path / "d", "notes")
    write_jsonl(source, _text_rows({"a": 5, "b": 6}))

    with pytest.raises(DatasetError, match="changed since dataset 'notes' was registered"):
        load_registered(tmp_path / "d", "notes", rehash=True)
    # Refused, the source is vouched for no more: the next load hashes it too.
    with pytest.raises(DatasetError, match="changed since dataset 'notes' was registered"):
        load_registered(tmp_path / "d", "notes")


def _counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the sources the listing hashes (streamed from the file)."""
    return _counting_calls(monkeypatch, "_file_sha256")


def test_every_hello_lists_a_settled_source_without_hashing_it_again_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hello lists the registrations (each reconnect says hello again): a large source is
    # hashed once, then compared by its identity, as `load_registered` does.
    from site_agent import registry

    _settled_at_once(monkeypatch)
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 8, "b": 8}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    hashed = _counting_hashes(monkeypatch)

    parsed = []
    real_parse = registry._parse_registration
    monkeypatch.setattr(
        registry, "_parse_registration", lambda *a: parsed.append(1) or real_parse(*a)
    )
    registry._parsed_registration.cache_clear()

    assert [e["status"] for e in list_registered(tmp_path / "d")] == ["ok"]
    assert [e["status"] for e in list_registered(tmp_path / "d")] == ["ok"]
    assert hashed == [source.resolve()]
    assert len(parsed) == 1  # nor its registration parsed again (its split lists every row)
    with source.open("a") as stream:  # a change moves its identity: hashed, and refused
        stream.write(json.dumps({"text": "one more", "label": "a"}) + "\n")
    assert [e["status"] for e in list_registered(tmp_path / "d")] == ["changed"]
    assert [e["status"] for e in list_registered(tmp_path / "d")] == ["changed"]
    assert len(hashed) == 3


def test_a_load_that_hashed_a_source_spares_the_listing_a_hash_and_one_that_refused_it_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from site_agent import registry

    _settled_at_once(monkeypatch)
    monkeypatch.setattr(registry, "_source_identity", lambda path: (1, 2, 3, 4, 5))
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 5, "b": 5}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    load_registered(tmp_path / "d", "notes")
    hashed = _counting_hashes(monkeypatch)

    assert [e["status"] for e in list_registered(tmp_path / "d")] == ["ok"]
    assert hashed == []
    # A change the identity hides, found by a preparation's full hash: the listing hashes again.
    write_jsonl(source, _text_rows({"a": 5, "b": 6}))
    with pytest.raises(DatasetError, match="changed since"):
        load_registered(tmp_path / "d", "notes", rehash=True)
    assert [e["status"] for e in list_registered(tmp_path / "d")] == ["changed"]
    assert hashed == [source.resolve()]


def test_a_registration_written_again_or_edited_in_place_is_read_at_the_next_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    _settled_at_once(monkeypatch)
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 30, "b": 30}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification", seed=1)
    path = tmp_path / "d" / "notes" / REGISTRATION_FILE

    first = load_registered(tmp_path / "d", "notes")
    assert load_registered(tmp_path / "d", "notes") is first
    # Written again (a new file), or edited in place with its size and mtime put back.
    replaced = register_dataset(
        tmp_path / "d", "notes", source, task_type="seq-classification", seed=2, replace=True
    )
    assert load_registered(tmp_path / "d", "notes") == replaced
    stat = path.stat()
    path.write_text(path.read_text().replace('"seed": 2', '"seed": 1'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = load_registered(tmp_path / "d", "notes")
    assert edited.seed == 1 and edited.train == replaced.train  # the split is the file's


def test_an_identity_vouches_for_a_source_only_for_a_while_after_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from site_agent import registry

    _settled_at_once(monkeypatch)
    source = write_jsonl(tmp_path / "notes.jsonl", _text_rows({"a": 8, "b": 8}))
    register_dataset(tmp_path / "d", "notes", source, task_type="seq-classification")
    reads = _counting_reads(monkeypatch)
    load_registered(tmp_path / "d", "notes")
    load_registered(tmp_path / "d", "notes")
    assert len(reads) == 1

    monkeypatch.setattr(registry, "_VOUCHED_FOR_NS", 0)  # the hash is now too old to vouch

    load_registered(tmp_path / "d", "notes")
    assert len(reads) == 2
