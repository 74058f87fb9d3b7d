"""What an analysis request says: which pair and roles, which inputs, which options.

Shared by the REST API (the body of POST /analyses/{kind}) and `lnscope analyze`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["original", "ln_free", "control"]


class CustomPairIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clean: str = Field(min_length=1, examples=["When Mary and John went to the store, John gave a drink to"])
    corrupt: str = Field(min_length=1, examples=["When Mary and John went to the store, Mary gave a drink to"])
    correct: str = Field(min_length=1, examples=[" Mary"])
    wrong: str = Field(min_length=1, examples=[" John"])


class TaskSpec(BaseModel):
    """A built-in task (prompts built for the pair's tokenizer) or custom clean/corrupt pairs."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ioi", "greater_than", "induction", "custom"] = Field(examples=["ioi"])
    n_prompts: int = Field(default=16, ge=1, description="prompts to build (built-in tasks)")
    seed: int = Field(default=0, ge=0)
    split: Literal["heldout", "train", "all"] = "heldout"
    pairs: list[CustomPairIn] | None = Field(default=None, description="for name = custom")

    @model_validator(mode="after")
    def _custom_needs_pairs(self) -> "TaskSpec":
        if self.name == "custom" and not self.pairs:
            raise ValueError("task.pairs: a custom task needs at least one clean/corrupt pair")
        if self.name != "custom" and self.pairs:
            raise ValueError("task.pairs: only a custom task takes pairs")
        return self


class AnalysisRequest(BaseModel):
    """Body of POST /analyses/{kind}: which models, which inputs, which options."""

    model_config = ConfigDict(
        extra="forbid",
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
    prompts: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    task: TaskSpec | None = None
    text: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1,
        description="free text (loss, ln-stats, confidence-neurons); default the pair's eval text")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the analysis kind (see GET /kinds)")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_input(self) -> "AnalysisRequest":
        if self.prompts is not None and self.task is not None:
            raise ValueError("give either prompts or task, not both")
        if self.roles is not None and len(set(self.roles)) != len(self.roles):
            raise ValueError("roles: each role at most once")
        return self
