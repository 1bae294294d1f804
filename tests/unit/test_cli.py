"""The `clipsearch` command's contract without a stack: one-line errors, exit codes, labels for evaluation."""

from __future__ import annotations

import pytest
from clipsearch_tools.cli import main
from clipsearch_tools.cli.evaluate import label_of

pytestmark = pytest.mark.unit


def _stderr_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_usage_errors_are_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["search", "text", "--dataset", "d"])
    assert exited.value.code == 2
    line = _stderr_line(capsys)
    assert line.startswith("error: ") and "QUERY" in line and "--help" in line


def test_a_k_that_is_not_a_number_is_refused_before_any_request(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["search", "text", "q", "--dataset", "d", "-k", "three"])
    assert exited.value.code == 2
    assert "k must be a whole number" in _stderr_line(capsys)


def test_without_a_stack_every_command_says_how_to_start_one(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPSEARCH_API_URL", raising=False)
    monkeypatch.delenv("CLIPSEARCH_BUCKET", raising=False)
    for argv in (["datasets"], ["dataset", "show", "x"], ["search", "text", "q", "--dataset", "x"]):
        assert main([*argv, "--home", str(tmp_path)]) == 1
        assert "clipsearch local up" in _stderr_line(capsys)


def test_a_deployed_stack_needs_its_bucket(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPSEARCH_BUCKET", raising=False)
    assert main(["datasets", "--api-url", "https://abc.execute-api.eu-west-1.amazonaws.com/"]) == 1
    assert "--bucket" in _stderr_line(capsys)


def test_local_status_without_a_stack_exits_non_zero_and_json_has_api_url(capsys, tmp_path):
    assert main(["local", "status", "--home", str(tmp_path), "--json"]) == 1
    out = capsys.readouterr().out
    assert '"running": false' in out and '"api_url": null' in out


def test_migrate_without_any_database_is_one_clear_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPSEARCH_DATABASE_URL", raising=False)
    assert main(["migrate", "--home", str(tmp_path)]) == 1
    assert "no database" in _stderr_line(capsys)


@pytest.mark.parametrize(
    ("name", "label"),
    [("beach.jpeg", "beach"), ("beach_3.jpeg", "beach"), ("datasets/photos/Beach_10.JPG", "beach"),
     ("eiffel_tower_2.jpeg", "eiffel_tower"), ("eiffel_tower.jpeg", "eiffel_tower")],
)
def test_labels_come_from_the_file_name_prefix(name, label):
    assert label_of(name) == label


def test_a_zero_refinement_is_sent_and_unset_ones_are_not() -> None:
    from clipsearch_tools.client import _present

    # --min-score 0 once vanished (0.0 == False): it is a value the user gave.
    assert _present({"min_score": 0.0, "offset": 0, "autocut": False, "prefix": None}) == {"min_score": 0.0, "offset": 0}
