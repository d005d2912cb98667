"""The `prmserve` command: `score` offline and against a server, resumable after a kill; `demo` input errors; imports stay light."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ServerProcess
from prmserve import batch, cli
from test_server import short_items

SLOW = ["--batch-size", "8", "--max-num-batched-tokens", "16", "--no-prefix-caching"]
CPU = ["--device", "cpu", "--dtype", "float32"]
BAD_LINES = {11: "not json {", 21: '{"problem": "p", "steps": []}', 31: "[1, 2]", 41: ""}  # 1-based line numbers


@pytest.fixture(scope="module")
def input_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 lines: items with an "id" to carry through, a bad JSON line, an invalid item, a non-object, a blank line."""
    lines = [json.dumps(short_items(1, seed=i)[0] | {"id": f"q{i}"}) for i in range(300)]
    for number, text in BAD_LINES.items():
        lines[number - 1] = text
    path = tmp_path_factory.mktemp("cli") / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def uninterrupted(input_file: Path, qwen_prm_dir: Path) -> list[dict]:
    """One run start to end, in process: what every other way of scoring must reproduce."""
    out = input_file.with_name("full.jsonl")
    assert cli.main(["score", str(input_file), "-o", str(out), "--model", str(qwen_prm_dir), *CPU, "--batch-size", "64"]) == 0
    return read_records(out)


def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert [r["line"] for r in got] == [r["line"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert {k: v for k, v in g.items() if k not in ("step_rewards", "aggregate")} == {
            k: v for k, v in w.items() if k not in ("step_rewards", "aggregate")
        }
        if "step_rewards" in w:
            assert g["step_rewards"] == pytest.approx(w["step_rewards"], abs=1e-6)


def test_score_writes_every_line_in_order_with_errors_recorded(uninterrupted: list[dict], input_file: Path, offline_prm, capsys) -> None:
    assert [r["line"] for r in uninterrupted] == [n for n in range(1, 301) if n != 41]  # the blank line has no record
    errors = {r["line"]: r["error"] for r in uninterrupted if "error" in r}
    assert set(errors) == {11, 21, 31}
    assert "bad JSON" in errors[11] and "'steps' must be a non-empty list" in errors[21] and "JSON object" in errors[31]
    good = [r for r in uninterrupted if "error" not in r]
    items = [{"problem": r["problem"], "steps": r["steps"]} for r in good]
    for record, want in zip(good, offline_prm.score(items)):
        assert record["id"] == f"q{record['line'] - 1}"
        assert record["step_rewards"] == pytest.approx(want.step_rewards, abs=1e-6)
        assert record["aggregate"] == min(record["step_rewards"])


def test_bad_lines_are_reported_on_stderr_with_their_number(input_file: Path, qwen_prm_dir: Path, tmp_path: Path, capsys) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(input_file.read_text().splitlines()[:25]) + "\n")
    assert cli.main(["score", str(small), "-o", str(tmp_path / "out.jsonl"), "--model", str(qwen_prm_dir), *CPU]) == 0
    err = capsys.readouterr().err
    assert f"{small}:11: bad JSON" in err and f"{small}:21:" in err and "2 line(s) could not be scored" in err


def test_resume_after_sigkill_writes_each_line_once(uninterrupted: list[dict], input_file: Path, qwen_prm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "prmserve", "score", str(input_file), "-o", str(out), "--model", str(qwen_prm_dir), *CPU, *SLOW]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_bytes().count(b"\n") >= 60):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes().count(b"\n")
    assert written < len(uninterrupted), "killed too late to test resuming"
    with out.open("ab") as f:
        f.write(b'{"problem": "What is (3 + ')  # a torn last line, as a kill mid-write leaves it
    assert cli.main(["score", str(input_file), "-o", str(out), "--model", str(qwen_prm_dir), *CPU, *SLOW]) == 0
    assert_same_records(read_records(out), uninterrupted)


def test_score_against_a_server_gives_the_offline_records(uninterrupted: list[dict], input_file: Path, server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert cli.main(["score", str(input_file), "-o", str(out), "--url", server.url, "--batch-size", "100"]) == 0
    assert_same_records(read_records(out), uninterrupted)


def test_resume_point_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"a": 1, "line": 1}\n{"error": "x", "line": 3}\n{"a": 2, "li')
    assert batch.resume_point(out) == 3
    assert out.read_text() == '{"a": 1, "line": 1}\n{"error": "x", "line": 3}\n'
    assert batch.resume_point(tmp_path / "missing.jsonl") == 0


def test_format_options_are_parsed_as_json_or_strings() -> None:
    args = cli.build_parser().parse_args(["serve", "m", "--option", "system_prompt=Be brief", "--option", "x=3"])
    assert args.option == [("system_prompt", "Be brief"), ("x", 3)]
    assert args.host == "127.0.0.1" and args.max_queue == 1024


def test_the_cli_and_engine_import_without_the_server_stack() -> None:
    code = (
        "import sys, prmserve.cli, prmserve.prm, prmserve.engine;"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client', 'prmserve.server') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    usage = subprocess.run([sys.executable, "-m", "prmserve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in usage and "score" in usage


def test_option_help_names_engine_and_format_options() -> None:
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["demo"].format_help().split())
    assert "an engine option (max_num_seqs" in help_text and "or a format option (system_prompt" in help_text


@pytest.mark.parametrize("text, problem", [
    ('{"problem": "p", "solutions": [["a"]]}\n\nnot json', ":3: bad JSON"),
    ('["p"]', ":1: a line must be a JSON object, not list"),
    ('{"solutions": [["a"]]}', ":1: 'problem' must be a non-empty string"),
    ('{"problem": "p"}', ":1: 'solutions' must be a non-empty list"),
    ('{"problem": "p", "solutions": []}', ":1: 'solutions' must be a non-empty list"),
    ('{"problem": "p", "solutions": [["a"], []]}', ":1: solution 1 must be a non-empty list of step strings"),
    ('{"problem": "p", "solutions": [["a"]], "first_errors": [1]}', ":1: 'first_errors' must hold, per solution, the index"),
    ("\n", ": no problems in the file"),
])
def test_a_bad_demo_problems_file_is_named_with_its_line(text: str, problem: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    assert cli.main(["demo", "--problems", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"prmserve demo: {path}{problem}")
    assert cli.main(["demo", "--problems", str(tmp_path / "missing.jsonl")]) == 1
    assert "no such problems file" in capsys.readouterr().err


def test_the_demo_prints_where_a_file_says_each_solution_goes_wrong(tmp_path: Path, capsys) -> None:
    path = tmp_path / "labelled.jsonl"
    path.write_text(json.dumps({"problem": "Tom has 3 apples. He buys 2 more apples. How many apples does Tom have now?",
                                "solutions": [["3 + 2 = 5.", "So 5."], ["3 + 2 = 6.", "So 6."]], "first_errors": [-1, 0]}) + "\n")
    assert cli.main(["demo", "--problems", str(path)]) == 0
    out = capsys.readouterr().out
    assert "written correct)" in out and "written with an error in step 1)" in out


def test_a_closed_stdout_stops_the_command_quietly() -> None:
    """`prmserve demo | head -2`: the reader leaves early; no traceback, the status of a SIGPIPE-killed command."""
    proc = subprocess.Popen([sys.executable, "-m", "prmserve", "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the demo writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.SIGPIPE_STATUS == 141
    assert err == ""


@pytest.mark.parametrize(("given", "written", "task"), [([], None, "synthetic"), ([], "word_problems", "word_problems"),
                                                        (["--task", "synthetic"], "word_problems", "synthetic")])
def test_evaluate_runs_the_task_the_checkpoint_names(given: list[str], written: str | None, task: str, tmp_path: Path,
                                                     monkeypatch, capsys) -> None:
    """`prmserve evaluate` measures a checkpoint on the task its quality.json names (a word-problem model is judged
    by the template hold-out), `--task` overrides it, and the seed comes from its training record."""
    import shutil

    from prmserve import evaluation
    from prmserve.bundled import word_problems
    from prmserve.prm import BUNDLED_MODEL
    from prmserve.evaluation import word_problem_task

    model = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, model)
    quality = json.loads((model / "quality.json").read_text())
    if written:
        quality["task"] = written
    else:  # a checkpoint written before quality.json named its task
        del quality["task"]
    (model / "quality.json").write_text(json.dumps(quality))
    ran: list[tuple[str, int, list]] = []

    def measured(name: str):
        def quality_of(score, seed):
            ran.append((name, seed, score(word_problems.generate(1, 3, "test"))))
            return {"f1": 0.5}
        return quality_of

    monkeypatch.setattr(evaluation, "held_out_quality", measured("synthetic"))
    monkeypatch.setattr(word_problem_task, "held_out_quality", measured("word_problems"))
    assert cli.main(["evaluate", str(model), *CPU, *given]) == 0
    assert [(name, seed) for name, seed, _ in ran] == [(task, quality["training"]["seed"])]
    assert len(ran[0][2][0]) == len(word_problems.generate(1, 3, "test")[0][1].steps)  # one reward a step: it scored
    assert json.loads(capsys.readouterr().out) == {"task": task, "seed": quality["training"]["seed"], "f1": 0.5}


@pytest.mark.parametrize("command", [["score", "in.jsonl", "-o", "out.jsonl"], ["eval", "best-of-n", "f.jsonl"],
                                     ["eval", "processbench", "f.jsonl"]])
def test_every_remote_command_reads_the_api_key_from_the_environment(command: list[str], monkeypatch) -> None:
    """`--url` without `--api-key` uses PRMSERVE_API_KEY in every command that talks to a server; the flag wins."""
    monkeypatch.setenv("PRMSERVE_API_KEY", "from-env")
    assert cli.build_parser().parse_args([*command, "--url", "http://x"]).api_key == "from-env"
    assert cli.build_parser().parse_args([*command, "--url", "http://x", "--api-key", "flag"]).api_key == "flag"
