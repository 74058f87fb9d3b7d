"""What an analysis request says: which pair and roles, which inputs, which options.

Shared by the REST API (the body of POST /analyses/{kind}) and `lnscope analyze`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

Role = Literal["original", "ln_free", "control"]

# Caps checked before anything is tokenized, so a request's cost is bounded up front.
MAX_PROMPT_CHARS = 16_000  # a prompt within the token limit is far shorter (a token is a few characters)
MAX_TOKEN_CHARS = 128  # one token's text (a target or an answer)
MAX_TEXT_CHARS = 300_000  # one free-text document
MAX_TEXTS = 1_000
MAX_SEED = 2**32 - 1  # what every random generator used accepts


def valid_unicode(value: str) -> str:
    """Refuse lone surrogates (JSON's "\\ud800"): no tokenizer or database can encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff): send valid Unicode") from None
    return value


PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(valid_unicode)]
TokenText = Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_CHARS), AfterValidator(valid_unicode)]
DocumentText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(valid_unicode)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN and Infinity are refused like unknown fields


class CustomPairIn(BaseModel):
    model_config = STRICT
    clean: PromptText = Field(examples=["When Mary and John went to the store, John gave a drink to"])
    corrupt: PromptText = Field(examples=["When Mary and John went to the store, Mary gave a drink to"])
    correct: TokenText = Field(examples=[" Mary"])
    wrong: TokenText = Field(examples=[" John"])


class TaskSpec(BaseModel):
    """A built-in task (prompts built for the pair's tokenizer) or custom clean/corrupt pairs."""

    model_config = STRICT
    name: Literal["ioi", "greater_than", "induction", "custom"] = Field(examples=["ioi"])
    n_prompts: int = Field(default=16, ge=1, le=100_000, description="prompts to build (built-in tasks)")
    seed: Seed = 0
    split: Literal["heldout", "train", "all"] | None = Field(
        default=None, description="templates and names held out from the tiny trio's training (ioi, greater_than); "
        "default heldout; induction has no split")
    pairs: list[CustomPairIn] | None = Field(default=None, max_length=10_000, description="for name = custom")

    @model_validator(mode="after")
    def _custom_needs_pairs(self) -> "TaskSpec":
        if self.name == "custom" and not self.pairs:
            raise ValueError("task.pairs: a custom task needs at least one clean/corrupt pair")
        if self.name != "custom" and self.pairs:
            raise ValueError("task.pairs: only a custom task takes pairs")
        if self.split is not None and self.name in ("induction", "custom"):
            raise ValueError(f"task.split: the {self.name} task has no split")
        return self


class AnalysisRequest(BaseModel):
    """Body of POST /analyses/{kind}: which models, which inputs, which options."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"pair": "tiny", "task": {"name": "ioi", "n_prompts": 8}, "options": {}},
                {"pair": "tiny", "roles": ["original", "ln_free"], "prompts": ["The capital of France is"],
                 "options": {"target": {"kind": "logit", "token": " Paris"}}},
            ]
        },
    )
    pair: str = Field(default="tiny", min_length=1, max_length=128)
    roles: list[Role] | None = Field(default=None, min_length=1, description="default: every role of the pair")
    prompts: list[PromptText] | None = Field(default=None, min_length=1, max_length=10_000)
    task: TaskSpec | None = None
    text: list[DocumentText] | None = Field(
        default=None, min_length=1, max_length=MAX_TEXTS,
        description="free text (loss, ln-stats, confidence-neurons); default the pair's eval text")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the analysis kind (see GET /kinds)")
    seed: Seed = 0

    @model_validator(mode="after")
    def _one_input(self) -> "AnalysisRequest":
        if self.prompts is not None and self.task is not None:
            raise ValueError("give either prompts or task, not both")
        if self.roles is not None and len(set(self.roles)) != len(self.roles):
            raise ValueError("roles: each role at most once")
        return self
