"""A reference search driver on prmserve's node API: best-of-N and beam search over an OpenAI-compatible generator.

    prmserve search --generator http://localhost:8001 --problems problems.jsonl --method beam --width 4 --depth 40 -o out.jsonl

- Steps come one at a time from `POST {generator}/v1/completions` with `stop=["\n\n"]` (vLLM's OpenAI server
  or any other): the prompt is the template with `{problem}` replaced (default `"Problem: {problem}\n\nSolution:\n\n"`;
  no other braces are read), then every step so far followed by `"\n\n"`. A step is the answer's text, stripped.
  A path ends when the generator stops for another reason than the separator, gives nothing, or a step holds
  `\boxed` or `The answer is`; or at `depth` steps.
- Scoring: a local `prmserve.PRM` or a `prmserve.Client`; paths rank by `aggregate` of their step rewards (min by
  default, as PRM papers pick best-of-N), the first of equals winning.
- best-of-n: `n` solutions (request i of a level has seed `seed + i`), scored in one `score` call.
  beam: each live beam asks `width` continuations (one request, n=width), scored by `extend` on its handle; the
  best `width` children overall go on, finished ones leave; every handle is released. The best finished path
  wins, else the best live one.
- Output: one line per problem: its fields, "chosen" {steps, step_rewards, aggregate, finished}, "tree" (every
  scored node: id, parent, step, step_rewards, aggregate, depth, finished; best-of-n's solutions as chains) and
  "line"; a bad line is {"line", "error"}; a rerun resumes after the last complete line.

Names are imported on first use, so `prmserve --help` (which reads METHODS and the default template) loads no httpx.
"""

from importlib import import_module

_HOMES = {
    "METHODS": "driver", "Scorer": "driver", "SearchConfig": "driver", "SearchResult": "driver",
    "beam_search": "driver", "best_of_n": "driver", "search": "driver",
    "DEFAULT_PROMPT_TEMPLATE": "templates", "STEP_SEPARATOR": "templates",
    "Continuation": "generator", "Generator": "generator", "GeneratorError": "generator", "GeneratorRejectedError": "generator",
    "search_file": "jsonl", "search_line": "jsonl",
    "SearchNode": "tree", "SearchTree": "tree", "states_answer": "tree",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'prmserve.search' has no attribute {name!r}")
    return getattr(import_module(f"prmserve.search.{_HOMES[name]}"), name)
