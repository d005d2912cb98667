"""Reading a policy's chat-formatted text back into (problem, response), for RL frameworks that send
the prompt and response as one rendered string (OpenRLHF's remote reward model, verl's /classify).

Known formats: ChatML (Qwen), Llama 3, Mistral `[INST]`, and DeepSeek (`User:`/`Assistant:` and the
`<｜User｜>`/`<｜Assistant｜>` markers). The problem is the last user turn; the response is the text
after the last assistant marker (and after what the template's generation prompt adds there, such as
DeepSeek-R1's `<think>\n`), without the end-of-turn markers that follow it or the whitespace templates
put around it, so the prompt + response text and the whole rendered text give the same response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prmserve.errors import InvalidInputError


@dataclass(frozen=True)
class ChatFormat:
    """How one template marks a user turn and the assistant's answer."""

    name: str
    user: re.Pattern  # group 1: the user turn's text
    assistant: str  # the marker after which the assistant's answer starts
    ends: tuple[str, ...]  # end-of-turn / end-of-text markers trailing the answer
    prompt_suffix: str = ""  # what the generation prompt writes after the assistant marker


FORMATS = (
    ChatFormat("chatml", re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S), "<|im_start|>assistant\n",
               ("<|im_end|>", "<|endoftext|>")),
    ChatFormat("llama3", re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>", "<|end_of_text|>")),
    ChatFormat("deepseek_r1", re.compile(r"<｜User｜>(.*?)<｜Assistant｜>", re.S), "<｜Assistant｜>", ("<｜end▁of▁sentence｜>",),
               "<think>\n"),
    ChatFormat("mistral", re.compile(r"\[INST\](.*?)\[/INST\]", re.S), "[/INST]", ("</s>",)),
    ChatFormat("deepseek", re.compile(r"User: (.*?)\n\nAssistant:", re.S), "Assistant:", ("<｜end▁of▁sentence｜>",)),
)


def chat_format_of(text: str) -> ChatFormat:
    """The format whose user turn appears in the text; InvalidInputError naming the formats otherwise."""
    for fmt in FORMATS:
        if fmt.user.search(text):
            return fmt
    names = ", ".join(f.name for f in FORMATS)
    raise InvalidInputError(f"cannot read the chat format of this text (no user turn of: {names}); send problem and response apart")


def problem_of(prompt: str) -> str:
    """The last user turn of a chat-formatted prompt."""
    fmt = chat_format_of(prompt)
    return fmt.user.findall(prompt)[-1].strip()


def split_chat_text(text: str, prompt: str | None = None) -> tuple[str, str]:
    """(problem, response) of prompt + response rendered as one text.

    With `prompt`, the response is what follows it (OpenRLHF sends both); else what follows the last
    assistant marker.
    """
    fmt = chat_format_of(prompt if prompt is not None else text)
    if prompt is not None and text.startswith(prompt):
        response = text[len(prompt) :]
    else:
        at = text.rfind(fmt.assistant)
        if at == -1:
            raise InvalidInputError(f"no assistant turn ({fmt.assistant!r}) in this {fmt.name} text")
        response = text[at + len(fmt.assistant) :]
        response = response.removeprefix(fmt.prompt_suffix) if fmt.prompt_suffix else response
    problem = fmt.user.findall(prompt if prompt is not None else text)[-1].strip()
    for end in fmt.ends:
        response = response.split(end)[0]
    if not response.strip():
        raise InvalidInputError(f"the {fmt.name} text has an empty response")
    return problem, response.strip()

