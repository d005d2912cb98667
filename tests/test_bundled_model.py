"""The PRM shipped inside the package: it loads by default, judges held-out problems, drives the demo, and
prints what the README's examples say."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from prmserve import PRM
from prmserve.bundled import word_problems
from prmserve.bundled.demo import load_problems
from prmserve.evaluation import prm_scorer
from prmserve.evaluation.word_problem_task import held_out_quality
from prmserve.prm import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[1]

# Floors below what the training recipe gave on every seed tried, on the smaller splits this test scores (seeds
# 1234 and 7, --step-grammar-share 1.0, 4,000 steps on an H100, scored here on CPU: F1 0.82 / 0.76, worst error
# kind 0.69 / 0.60, best-of-4 0.17 / 0.20 over majority vote and 0.37 / 0.38 over a random pick, slip pairs
# 0.93 / 0.92; bench/notes/small_prm.md). Issue #16's own floor for F1 (0.90) is not met yet; quality.json has
# the shipped checkpoint's full numbers.
MIN_F1 = 0.72
MIN_ACCURACY_PER_ERROR_KIND = 0.55
MIN_BEST_OF_4_GAIN_OVER_MAJORITY = 0.12
MIN_BEST_OF_4_GAIN_OVER_RANDOM = 0.30
MIN_CORRECT_ABOVE_SLIP = 0.88


@pytest.fixture(scope="module")
def prm():
    prm = PRM()
    yield prm
    prm.close()


def test_default_model_is_the_bundled_qwen_prm_layout(prm) -> None:
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForProcessRewardModel"]
    assert prm.format_name == "qwen_prm"
    assert (BUNDLED_MODEL / "model.safetensors").stat().st_size <= 20 * 1024**2


def test_held_out_quality_clears_its_floor() -> None:
    """Judged through `PRM` on the template hold-out (wording, names, items and number bands training never uses);
    with the CPU's batch-invariant kernels off, which halves the time and changes rewards only in the last bits."""
    trained = json.loads((BUNDLED_MODEL / "quality.json").read_text())
    assert trained["task"] == "word_problems"
    with closing(PRM(deterministic=False)) as prm:
        report = held_out_quality(prm_scorer(prm), trained["training"]["seed"], n_val=300, n_test=400, n_best_of=150,
                                  n_slip_pairs=150)
    assert report["processbench"]["f1"] >= MIN_F1, report
    for kind in word_problems.ERROR_KINDS:
        assert report["processbench"][f"acc_{kind}"] >= MIN_ACCURACY_PER_ERROR_KIND, (kind, report)
    best_of = report["best_of_4"]
    assert best_of["prm_min_step"] - best_of["majority_vote"] >= MIN_BEST_OF_4_GAIN_OVER_MAJORITY, report
    assert best_of["prm_min_step"] - best_of["random_pick"] >= MIN_BEST_OF_4_GAIN_OVER_RANDOM, report
    assert report["slip_pairs"]["correct_above_slip"] >= MIN_CORRECT_ABOVE_SLIP, report


def test_readme_main_command_prints_the_demo() -> None:
    done = subprocess.run([sys.executable, "-m", "prmserve", "demo"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    problems = load_problems()
    assert done.stdout.count("Best-of-4 pick: solution") == len(problems)
    for problem in problems:
        assert problem["problem"] in done.stdout
        for steps in problem["solutions"]:
            assert all(step in done.stdout for step in steps)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_the_python_api_example_prints_what_its_comment_shows(prm) -> None:
    """The bundled model's rewards for the README's first Python example, to the 3 places shown, every step above 0.5."""
    (code, *_) = re.findall(r"```python\n(.*?)```", readme_section("Python API"), re.DOTALL)
    item = eval(re.search(r"prm\.score\(\[\n\s*(\{.*?\}),\n\s*\]\)", code, re.DOTALL).group(1))  # a literal dict
    shown = json.loads(re.search(r"step_rewards\s+# with PRM\(\): (\[.*?\])", code).group(1))
    rewards = prm.score([item])[0].step_rewards
    assert rewards == pytest.approx(shown, abs=6e-4) and min(rewards) > 0.5, rewards


def test_the_curl_example_gets_what_it_shows(prm) -> None:
    """The body of the README's curl to /v1/score, sent to an app serving the bundled model."""
    from prmserve.server import create_app

    section = readme_section("Server, client, command line")
    body = json.loads(re.search(r"curl -s localhost:8000/v1/score .*? -d '(\{.*?\})'", section).group(1))
    shown = json.loads(re.search(r"# -> with the bundled model: (\{.*\})", section).group(1))

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(create_app(prm, log_requests=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/score", json=body)

    response = asyncio.run(send())
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["step_rewards"] == pytest.approx(shown["step_rewards"], abs=6e-3) and min(result["step_rewards"]) > 0.5
    assert result["aggregate"] == pytest.approx(shown["aggregate"], abs=6e-3)


def readme_table_rows() -> list[tuple[str, list[str], list[float], str, bool]]:
    """(problem, steps, rewards shown, note, marked as what it cannot judge) for each row of the README's table."""
    section = readme_section("The bundled small PRM")
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        problem, cannot = cells[0].removeprefix("*cannot:* "), cells[0].startswith("*cannot:* ")
        steps = [step.replace("\\\\", "\\") for step in re.findall(r"`([^`]*)`", cells[1])]
        shown = re.match(r"([0-9., ]+?)(?: \((.*)\))?$", cells[2])
        rows.append((problem, steps, [float(x) for x in shown.group(1).split(",")], shown.group(2) or "", cannot))
    return rows


def test_the_readme_table_shows_what_the_model_gives(prm) -> None:
    """Every row of the README's can/cannot table, to the 3 places shown; in the rows of what it can judge, a correct
    solution's steps are above 0.5 and an erroneous one's (its error named in brackets) end below 0.5."""
    rows = readme_table_rows()
    assert len(rows) >= 10 and sum(cannot for *_, cannot in rows) >= 3
    results = prm.score([{"problem": problem, "steps": steps} for problem, steps, *_ in rows])
    for (problem, steps, shown, error, cannot), result in zip(rows, results):
        assert len(shown) == len(steps), (problem, steps)
        assert result.step_rewards == pytest.approx(shown, abs=6e-4), (problem, steps, result.step_rewards)
        if cannot:
            continue
        if error:
            assert result.step_rewards[-1] < 0.5, (problem, steps)
        else:
            assert min(result.step_rewards) > 0.5, (problem, steps)
