"""A reference search driver on prmserve's node API: best-of-N and beam search over an OpenAI-compatible generator.

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
