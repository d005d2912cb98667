"""`prmserve search`: best-of-N and beam search over a fake OpenAI-compatible generator, scored by a PRM."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fake_generator import MODEL, FakeGenerator
from prmserve import cli
from prmserve.bundled.demo import load_problems
from prmserve.results import ScoreResult
from prmserve.search import Generator, SearchConfig, beam_search, best_of_n, states_answer
from prmserve.search.templates import DEFAULT_PROMPT_TEMPLATE, step_prompt

CPU = ["--device", "cpu", "--dtype", "float32"]
PROBLEMS = load_problems()  # the bundled demo problems: four solutions each, most ending in a stated answer


@pytest.fixture(scope="module")
def fake() -> FakeGenerator:
    with FakeGenerator(PROBLEMS) as server:
        yield server


@pytest.fixture(scope="module")
def generator(fake: FakeGenerator) -> Generator:
    with Generator(fake.url) as client:
        yield client


@pytest.fixture(scope="module")
def prm(single_torch_thread: None):
    """The bundled small PRM: it judges these problems, so picks mean something (and it loads in a second)."""
    from prmserve import PRM

    model = PRM(device="cpu", dtype="float32")
    yield model
    model.close()


@pytest.mark.parametrize(("step", "final"), [("So the answer is \\boxed{5}.", True), ("The answer is 19.", True),
                                             ("#### 205", True), ("Then 145 + 60 = 205 cookies.", False)])
def test_a_step_that_states_the_answer_ends_the_path(step: str, final: bool) -> None:
    assert states_answer(step) is final


def by_hand(rewards: list[float], method: str) -> float:
    return {"min": min, "last": lambda r: r[-1]}[method](rewards)


@pytest.mark.parametrize("method", ["min", "last"])
def test_best_of_n_picks_the_argmax_of_the_candidates_aggregate(prm, generator: Generator, method: str) -> None:
    for problem in PROBLEMS:
        config = SearchConfig(n=6, depth=40, aggregate=method, seed=1)
        result = best_of_n(problem["problem"], generator, prm, config)
        solutions = problem["solutions"]
        candidates = [solutions[(1 + i) % len(solutions)] for i in range(6)]  # seed 1 + i follows solution (1 + i) mod 4
        scores = [by_hand(r.step_rewards, method) for r in prm.score([{"problem": problem["problem"], "steps": c} for c in candidates])]
        best = max(range(6), key=lambda i: (scores[i], -i))
        chosen = result.record()["chosen"]
        assert chosen["steps"] == candidates[best]
        assert chosen["aggregate"] == pytest.approx(scores[best], abs=1e-6)
        assert chosen["finished"]
        leaves = [n for n in result.record()["tree"] if n["finished"]]
        assert [n["aggregate"] for n in leaves] == pytest.approx(scores, abs=1e-6)


def test_best_of_n_asks_one_step_at_a_time(fake: FakeGenerator, generator: Generator, prm) -> None:
    problem = PROBLEMS[0]
    fake.requests.clear()
    best_of_n(problem["problem"], generator, prm, SearchConfig(n=2, seed=5))
    first = problem["solutions"][5 % 4]
    asked = [r for r in fake.requests if r["seed"] == 5]
    assert [r["prompt"] for r in asked] == [step_prompt(DEFAULT_PROMPT_TEMPLATE, problem["problem"], first[:k]) for k in range(len(first))]
    assert asked[1]["prompt"] == f"Problem: {problem['problem']}\n\nSolution:\n\n{first[0]}\n\n"
    assert all(r["stop"] == ["\n\n"] and r["n"] == 1 and r["model"] == MODEL and r["max_tokens"] == 512 for r in fake.requests)


def test_best_of_n_stops_at_depth_unfinished(prm, generator: Generator) -> None:
    chosen = best_of_n(PROBLEMS[1]["problem"], generator, prm, SearchConfig(n=4, depth=2)).record()["chosen"]
    assert len(chosen["steps"]) == 2 and not chosen["finished"]


def assert_beam_tree(record: dict[str, Any], width: int) -> None:
    """Parents come before children; at every depth only the top `width` unfinished nodes were expanded."""
    nodes = record["tree"]
    by_id = {n["id"]: n for n in nodes}
    for node in nodes:
        if node["parent"] is not None:
            parent = by_id[node["parent"]]
            assert parent["id"] < node["id"] and parent["depth"] + 1 == node["depth"] and not parent["finished"]
            assert node["step_rewards"][:-1] == pytest.approx(parent["step_rewards"], abs=1e-6)
    expanded = {n["parent"] for n in nodes}
    for depth in {n["depth"] for n in nodes}:
        level = [n for n in nodes if n["depth"] == depth]
        top = {n["id"] for n in sorted(level, key=lambda n: -n["aggregate"])[:width]}
        assert {n["id"] for n in level if n["id"] in expanded} <= top
        assert len(level) <= width * width


@pytest.mark.parametrize("width", [1, 2, 3])
def test_beam_search_releases_its_handles_and_its_rewards_equal_scoring_the_path(prm, generator: Generator, width: int) -> None:
    for problem in PROBLEMS[:3]:
        result = beam_search(problem["problem"], generator, prm, SearchConfig(method="beam", width=width, depth=10))
        assert len(prm.nodes) == 0
        record = result.record()
        chosen = record["chosen"]
        assert chosen["finished"]
        whole = prm.score([{"problem": problem["problem"], "steps": chosen["steps"]}])[0]
        assert chosen["step_rewards"] == pytest.approx(whole.step_rewards, abs=1e-6)
        assert chosen["aggregate"] == pytest.approx(min(whole.step_rewards), abs=1e-6)
        assert_beam_tree(record, width)


class EvenScorer:
    """Every step gets 0.5: all children tie. It checks the handles it gives and takes back."""

    def __init__(self) -> None:
        self.kept: dict[str, list[float]] = {}  # handle -> its node's rewards
        self.released: list[str] = []

    def _kept(self, rewards: list[float]) -> ScoreResult:
        handle = f"h{len(self.kept)}"
        self.kept[handle] = rewards
        return ScoreResult(rewards, handle=handle)

    def score(self, items, *, keep=False):
        assert keep
        return [self._kept([0.5] * len(item["steps"])) for item in items]

    def extend(self, handle, children, *, keep=False):
        assert keep and handle in self.kept and handle not in self.released
        return [self._kept(self.kept[handle] + [0.5] * len(steps)) for steps in children]

    def release(self, handles):
        assert all(h in self.kept and h not in self.released for h in handles)
        self.released += handles
        return len(handles)


def test_beam_ties_keep_the_first_children_and_every_handle_is_released_once(generator: Generator) -> None:
    scorer = EvenScorer()
    record = beam_search(PROBLEMS[0]["problem"], generator, scorer, SearchConfig(method="beam", width=3, depth=10)).record()
    assert sorted(scorer.released) == sorted(scorer.kept)
    nodes = record["tree"]
    expanded = {n["parent"] for n in nodes}
    for depth in range(1, max(n["depth"] for n in nodes)):
        first = [n for n in nodes if n["depth"] == depth][:3]  # ties: the first children scored go on
        assert {n["id"] for n in nodes if n["depth"] == depth and n["id"] in expanded} == {n["id"] for n in first if not n["finished"]}


def test_beam_search_at_its_depth_picks_the_best_live_beam(prm, generator: Generator) -> None:
    result = beam_search(PROBLEMS[2]["problem"], generator, prm, SearchConfig(method="beam", width=2, depth=2))
    assert len(prm.nodes) == 0
    chosen, tree = result.record()["chosen"], result.record()["tree"]
    assert len(chosen["steps"]) == 2 and not chosen["finished"]
    assert chosen["aggregate"] == max(n["aggregate"] for n in tree if n["depth"] == 2 and not n["finished"])


def test_search_through_a_prmserve_server(server, offline_prm, generator: Generator) -> None:
    from prmserve import Client

    with Client(server.url) as client:
        for method in ("best-of-n", "beam"):
            chosen = best_of_n if method == "best-of-n" else beam_search
            problem = PROBLEMS[3]["problem"]
            picked = chosen(problem, generator, client, SearchConfig(method=method, n=4, width=2)).record()["chosen"]
            whole = offline_prm.score([{"problem": problem, "steps": picked["steps"]}])[0]
            assert picked["step_rewards"] == pytest.approx(whole.step_rewards, abs=1e-5)


def test_cli_scores_against_a_server(server, offline_prm, fake: FakeGenerator, problems_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "remote.jsonl"
    assert cli_search(fake, problems_file, out, "--url", server.url) == 0
    good = [r for r in read(out) if "error" not in r]
    assert len(good) == len(PROBLEMS) and len(read(out)) == 10
    whole = offline_prm.score([{"problem": r["problem"], "steps": r["chosen"]["steps"]} for r in good])
    assert [r["chosen"]["step_rewards"] for r in good] == [pytest.approx(w.step_rewards, abs=1e-5) for w in whole]


BAD = {3: "not json {", 5: '{"answer": 1}', 6: "[1, 2]", 7: "", 8: '{"problem": "a problem the generator does not know"}'}


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = [json.dumps(p | {"id": f"p{i}"}) for i, p in enumerate(PROBLEMS)]
    for number, text in sorted(BAD.items()):
        lines.insert(number - 1, text)
    path = tmp_path_factory.mktemp("search") / "problems.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rounded(value: Any) -> Any:
    """Records compared across runs and fresh caches: floats to 6 places."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def cli_search(fake: FakeGenerator, problems: Path, out: Path, *extra: str) -> int:
    return cli.main(["search", "--generator", fake.url, "--problems", str(problems), "-o", str(out),
                     "--method", "beam", "--width", "2", "--depth", "12", *CPU, *extra])


def test_cli_end_to_end_with_error_records(fake: FakeGenerator, problems_file: Path, tmp_path: Path, capsys, prm) -> None:
    out = tmp_path / "out.jsonl"
    assert cli_search(fake, problems_file, out) == 0
    records = read(out)
    assert [r["line"] for r in records] == [n for n in range(1, 12) if n != 7]  # the blank line has no record
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {3, 5, 6, 8}
    assert "bad JSON" in errors[3] and "'problem'" in errors[5] and "JSON object" in errors[6] and "refused" in errors[8]
    stderr = capsys.readouterr().err
    assert f"{problems_file}:3: bad JSON" in stderr and "4 problem(s) could not be searched" in stderr
    good = [r for r in records if "error" not in r]
    assert [r["id"] for r in good] == [f"p{i}" for i in range(len(PROBLEMS))]
    for record in good:
        assert set(record) >= {"problem", "solutions", "answer", "chosen", "tree", "line"}
        whole = prm.score([{"problem": record["problem"], "steps": record["chosen"]["steps"]}])[0]
        assert record["chosen"]["step_rewards"] == pytest.approx(whole.step_rewards, abs=1e-6)
        assert_beam_tree(record, 2)


def test_cli_resumes_after_a_truncated_output(fake: FakeGenerator, problems_file: Path, tmp_path: Path) -> None:
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    assert cli_search(fake, problems_file, full, "--method", "best-of-n", "--n", "4") == 0
    lines = full.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed while writing line 4's record
    fake.requests.clear()
    assert cli_search(fake, problems_file, cut, "--method", "best-of-n", "--n", "4") == 0
    assert rounded(read(cut)) == rounded(read(full))
    first_left = json.loads(lines[3])["problem"]
    assert all(not r["prompt"].startswith(f"Problem: {p['problem']}\n") for r in fake.requests for p in PROBLEMS[:2])
    assert any(first_left in r["prompt"] for r in fake.requests)


def test_cli_names_a_generator_that_refuses_the_connection(problems_file: Path, tmp_path: Path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes
    assert cli.main(["search", "--generator", url, "--problems", str(problems_file), "-o", str(tmp_path / "o.jsonl"), *CPU]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prmserve search: cannot reach the generator at {url}")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_custom_prompt_template(fake: FakeGenerator, prm) -> None:
    template = "Q: {problem} (answer in \\boxed{})\nA:\n\n"
    with FakeGenerator(PROBLEMS, template) as custom, Generator(custom.url, prompt_template=template) as client:
        assert client.prompt("2+2?", ["2 + 2 = 4."]) == "Q: 2+2? (answer in \\boxed{})\nA:\n\n2 + 2 = 4.\n\n"
        chosen = best_of_n(PROBLEMS[0]["problem"], client, prm, SearchConfig(n=4)).record()["chosen"]
        assert chosen["steps"] in PROBLEMS[0]["solutions"]
    with pytest.raises(ValueError, match="must contain '{problem}'"):
        Generator(fake.url, prompt_template="no place for it")


def test_the_command_line_parser_loads_no_httpx() -> None:
    code = "import sys, prmserve.cli; prmserve.cli.build_parser(); print('httpx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("settings, message", [
    ({"method": "dfs"}, "unknown search method"), ({"aggregate": "max"}, "unknown aggregation"), ({"width": 0}, ">= 1"),
])
def test_bad_settings_are_named(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchConfig(**settings)
