"""Build the bundled best-of-N sample from ../shared/data/gsm8k (real GSM8K problems with four real
model-written solutions each and their correctness labels; MIT licence, OpenAI 2021).

    python scripts/make_gsm8k_best_of_n.py      # writes src/prmserve/bundled/gsm8k_best_of_4.jsonl

Each solution's lines are its steps and its `A: ...` line its final answer (kept as the last step,
as the solvers wrote it); `correct` is the data set's own label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
OUT = ROOT / "src" / "prmserve" / "bundled" / "gsm8k_best_of_4.jsonl"
SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def final_answer(solution: str) -> str:
    """The text after the solution's last `A:` line."""
    lines = [line for line in solution.splitlines() if line.strip()]
    return lines[-1].removeprefix("A:").strip() if lines and lines[-1].startswith("A:") else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args()
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[: args.problems]]
    with OUT.open("w", encoding="utf-8") as out:
        for row in rows:
            solutions = [{"steps": [s for s in row[k]["solution"].splitlines() if s.strip()],
                          "final_answer": final_answer(row[k]["solution"]), "correct": row[k]["is_correct"], "solver": k}
                         for k in SOLVERS]
            record = {"problem": row["question"], "answer": final_answer(row["ground_truth"]), "solutions": solutions}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{len(rows)} problems -> {OUT}")


if __name__ == "__main__":
    main()
