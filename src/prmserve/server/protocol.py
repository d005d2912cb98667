"""The HTTP API's request and response bodies; these pydantic models are the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from prmserve.results import AGGREGATIONS

Aggregation = Literal[AGGREGATIONS]  # type: ignore[valid-type]
MAX_TIMEOUT_S = 24 * 3600.0
PRIORITY_LIMIT = 2**31  # |priority| below it: room for any scheme, and a 5,000-digit integer is refused by name


def _whole_number(value: Any) -> Any:
    """JSON Schema's integers include 5.0: a float without a fraction is the integer it equals."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Strict, like every other field: "5" is not a number of seconds (an integer is), nor "5" an integer (5.0 is).
Integer = Annotated[StrictInt, BeforeValidator(_whole_number)]
Timeout = Annotated[StrictFloat, Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]
Priority = Annotated[StrictInt, Field(gt=-PRIORITY_LIMIT, lt=PRIORITY_LIMIT), BeforeValidator(_whole_number)]


# Each item kind's required fields and the fields it may also hold: the schema's oneOf and the validator's rule.
ITEM_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "steps": (("problem", "steps"), ()),
    "completion": (("problem", "completion"), ("step_split",)),
    "messages": (("messages",), ("step_split",)),
    "text": (("text",), ()),
    "token_ids": (("token_ids",), ()),
}
ONE_ITEM_KIND = "an item needs exactly one of: problem + steps, problem + completion, messages, text, token_ids"


def _not_null(schema: dict[str, Any], fields: tuple[str, ...]) -> None:
    """These fields may be left out but not sent as null: drop `null` from their types and their default."""
    for name in fields:
        field = schema["properties"][name]
        del field["default"]
        options = [option for option in field.pop("anyOf") if option != {"type": "null"}]
        field.update(options[0] if len(options) == 1 else {"anyOf": options})


def _refuse_null(value: Any) -> Any:
    """An optional field's explicit null (left out is how to send none)."""
    if value is None:
        raise ValueError("must not be null: leave the field out instead")
    return value


def _refuse_empty(value: Any) -> Any:
    """An empty text or list of inputs: nothing to score (the schema's minLength / minItems)."""
    if value == "" or value == []:
        raise ValueError("must not be empty")
    return value


def _non_empty_input(schema: dict[str, Any]) -> None:
    """`input` of text(s) or token id list(s): neither a text nor a list may be empty."""
    for option in schema["properties"]["input"]["anyOf"]:
        option["minLength" if option["type"] == "string" else "minItems"] = 1


def _item_schema(schema: dict[str, Any]) -> None:
    """ScoreItem's schema: exactly one kind, each with only its own fields."""
    _not_null(schema, tuple(schema["properties"]))
    for text in ("problem", "completion", "text"):
        schema["properties"][text]["minLength"] = 1
    for listed in ("steps", "messages", "token_ids"):
        schema["properties"][listed]["minItems"] = 1
    fields = list(schema["properties"])
    schema["oneOf"] = [
        {"required": list(required), "properties": {f: False for f in fields if f not in required + optional}}
        for required, optional in ITEM_KINDS.values()
    ]


def _pooling_schema(schema: dict[str, Any]) -> None:
    """PoolingRequest's schema: exactly one of `input` / `messages`, neither empty."""
    _not_null(schema, ("input", "messages"))
    _non_empty_input(schema)
    for option in schema["properties"]["input"]["anyOf"]:
        if option.get("items", {}).get("type") == "array":
            option["items"]["minItems"] = 1  # each token id list is one input: an empty one has no step
    schema["properties"]["messages"]["minItems"] = 1
    schema["oneOf"] = [{"required": [f], "properties": {other: False}} for f, other in (("input", "messages"), ("messages", "input"))]


class StepSplitRegex(BaseModel):
    """Split a completion where this regular expression matches."""

    model_config = ConfigDict(extra="forbid")

    regex: StrictStr


class ScoreItem(BaseModel):
    """One solution to score: `problem` + `steps`, `problem` + `completion` (split into steps by
    `step_split`, default the server's, "\n\n"), a chat in `messages` (the last user turn is the problem,
    the final assistant turn the completion), or pre-formatted `text` or `token_ids`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_item_schema)

    # Fields left out are None; an explicit null is refused (the schema has no null), like a wrong type. Empty
    # strings and lists are refused by PRM.encode (the schema's minLength/minItems), with the same message as
    # offline scoring gives (`prmserve score --url` writes the same error records as without it).
    problem: StrictStr | None = Field(None, description="The question; goes with `steps` or `completion`")
    steps: list[StrictStr] | None = Field(None, description="The solution's steps, in order")
    completion: StrictStr | None = Field(
        None, description="The solution as one text, split into steps by `step_split`")
    messages: list["ChatMessage"] | None = Field(
        None, description="A chat ending with the assistant's answer to score")
    step_split: StrictStr | StepSplitRegex | None = Field(
        None, description="Separator between steps of a `completion` or chat answer: a string or {\"regex\": pattern}")
    text: StrictStr | None = Field(
        None, description="A whole input already in the model's format, separators included")
    token_ids: list[Integer] | None = Field(
        None, description="A whole input already tokenised, separators included")

    _not_null = field_validator("*")(_refuse_null)

    @model_validator(mode="after")
    def _one_kind(self) -> "ScoreItem":
        kinds = [kind for kind in ITEM_KINDS if kind in self.model_fields_set]
        if len(kinds) != 1:
            raise ValueError(ONE_ITEM_KIND)
        required, optional = ITEM_KINDS[kinds[0]]
        if "step_split" in self.model_fields_set and "step_split" not in optional:
            raise ValueError("'step_split' applies to 'completion' and 'messages' items only")
        if "problem" in self.model_fields_set and "problem" not in required:
            if kinds[0] == "messages":
                raise ValueError("a 'messages' item takes its problem from the user turn: drop 'problem'")
            raise ValueError(f"a '{kinds[0]}' item is the whole input: drop 'problem'")
        if "problem" in required and "problem" not in self.model_fields_set:
            raise ValueError(f"a '{kinds[0]}' item needs its 'problem'")
        return self

    def to_item(self) -> dict:
        """The item as `PRM.encode` takes it (only the fields that were sent)."""
        item = self.model_dump(exclude_unset=True)
        if self.messages is not None:
            item["messages"] = [m.to_message() for m in self.messages]
        return item


class ScoreRequest(BaseModel):
    """Score items; lower `priority` runs first; `timeout` (seconds) bounds the wait, then the work is dropped."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"items": [{"problem": "What is 2 + 3?", "steps": ["2 + 3 = 5", "The answer is 5."]}]}]},
    )

    items: list[ScoreItem] = Field(min_length=1, description="Scored together; results come back in this order")
    priority: Priority = Field(0, description="Lower values are scheduled first (as in vLLM)")
    aggregate: Aggregation = Field("min", description="How each result's `aggregate` reduces its step rewards")
    timeout: Timeout | None = Field(
        None, description="Seconds to wait before answering 504 and dropping the work (default: the server's)"
    )
    keep: StrictBool = Field(False, description="Keep each scored item as a node: results get a `handle` for /v1/extend")


class ExtendRequest(BaseModel):
    """Score children of a kept node: each child is a list of new steps after the node's steps."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"handle": "<from /v1/score with keep>", "children": [["3 * 2 = 6."], ["3 * 2 = 5.", "So 5."]]}]},
    )

    handle: StrictStr = Field(description="A node's handle, from /v1/score or /v1/extend with `keep`")
    children: list[list[StrictStr]] = Field(min_length=1, description="Each child's new steps; results come back in this order")
    priority: Priority = Field(0, description="Lower values are scheduled first (as in vLLM)")
    aggregate: Aggregation = Field("min", description="How each result's `aggregate` reduces its step rewards")
    timeout: Timeout | None = Field(
        None, description="Seconds to wait before answering 504 and dropping the work (default: the server's)"
    )
    keep: StrictBool = Field(False, description="Keep each child as a node too (its result gets a `handle`)")


class ReleaseRequest(BaseModel):
    """Let kept nodes go; unknown handles are ignored (they may have expired)."""

    model_config = ConfigDict(extra="forbid")

    handles: list[StrictStr] = Field(min_length=1)


class ReleaseResponse(BaseModel):
    released: int = Field(description="How many of the handles still existed")


class Usage(BaseModel):
    """Tokens in the prompts = tokens computed + tokens whose KV and head outputs came from the prefix cache."""

    prompt_tokens: int
    computed_tokens: int
    cached_tokens: int


class ScoreResultBody(BaseModel):
    """One item's step rewards (in step order), their aggregate, and its token usage."""

    step_rewards: list[float]
    aggregate: float
    usage: Usage
    handle: str | None = Field(None, description="The node's handle when it was kept")
    step_spans: list[tuple[int, int]] | None = Field(
        None, description="A completion's steps as [start, end) characters of it (completion and chat items)")


class ScoreResponse(BaseModel):
    """Results in item order, and the usage of the whole request."""

    results: list[ScoreResultBody]
    usage: Usage


class TextPart(BaseModel):
    """A text part of a chat message's content."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """A chat turn, rendered with the model's chat template."""

    role: StrictStr
    content: StrictStr | list[TextPart]

    def to_message(self) -> dict[str, str]:
        """The message with its content parts joined into one string, as chat templates expect."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class PoolingRequest(BaseModel):
    """vLLM's `/pooling` request: `input` (text(s) or token id list(s)) or one chat in `messages`."""

    # vLLM clients send more fields (user, truncate_prompt_tokens, ...)
    model_config = ConfigDict(extra="ignore", json_schema_extra=_pooling_schema)

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | list[Integer] | list[list[Integer]] | None = None
    messages: list[ChatMessage] | None = None
    task: StrictStr | None = None
    priority: Priority = 0
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each input's rows, flattened, as the base64 of their `embed_dtype` bytes (as vLLM)"
    )
    embed_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Element type of base64 data")
    endianness: Literal["native", "little", "big"] = Field("native", description="Byte order of base64 data")
    use_activation: StrictBool | None = Field(
        None, description="False: the reward head's raw outputs instead of `[1 - reward, reward]` (default True)"
    )
    activation: StrictBool | None = Field(None, description="vLLM's older name of `use_activation`")
    softmax: StrictBool | None = Field(None, description="vLLM's older name of `use_activation`")

    _not_null = field_validator("input", "messages")(_refuse_null)
    _not_empty = field_validator("input", "messages")(_refuse_empty)

    @model_validator(mode="after")
    def _one_source(self) -> "PoolingRequest":
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' or 'messages'")
        return self

    @property
    def activated(self) -> bool:
        """vLLM's precedence: `use_activation`, else `softmax`, else `activation`, else on."""
        return next((v for v in (self.use_activation, self.softmax, self.activation) if v is not None), True)


class PoolingData(BaseModel):
    """One input's rows, one per step: `[1 - reward, reward]` (or the head's raw outputs); a string when base64."""

    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] | str


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class PoolingResponse(BaseModel):
    """vLLM's `/pooling` response."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: PoolingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prmserve"
    format: str
    max_model_len: int


class ModelList(BaseModel):
    """OpenAI-style model list; `data[0].id` is the served model's name."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Version(BaseModel):
    """The running prmserve's version."""

    version: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    pending: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every error: what went wrong, the error's kind (a prmserve error class name where one applies), the field."""

    error: ErrorInfo


ScoreItem.model_rebuild()


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request: prompt + response texts, the prompts, and labels (unused)."""

    model_config = ConfigDict(extra="ignore")

    query: list[StrictStr] = Field(min_length=1, description="Each the policy's prompt followed by its response, as rendered text")
    prompts: list[StrictStr] | None = Field(None, description="The prompts, to find where each response starts")
    labels: list | None = Field(None, description="Reference answers; a PRM does not read them")


class ClassifyRequest(BaseModel):
    """vLLM's `/classify` request; each input is a chat-formatted prompt + response."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_non_empty_input)

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] = Field(description="Chat-formatted text(s) ending with the response to score")
    activation: StrictBool = True

    _not_empty = field_validator("input")(_refuse_empty)


class ClassifyData(BaseModel):
    index: int
    object: Literal["classification"] = "classification"
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    """vLLM's `/classify` response: per input, [1 - reward, reward]."""

    object: Literal["list"] = "list"
    model: str
    data: list[ClassifyData]
    usage: PoolingUsage


class SleepResponse(BaseModel):
    """What `POST /sleep` gave back (vLLM answers 200 with no body; these fields are extra)."""

    level: int
    freed_bytes: int = Field(description="memory returned: used device memory before less after (torch.cuda.mem_get_info) "
                                         "on CUDA; the KV pool's bytes (and the weights' at level 2) on CPU")
    measured_by: str
    seconds: float


class IsSleepingResponse(BaseModel):
    """vLLM's `GET /is_sleeping` body."""

    is_sleeping: bool
