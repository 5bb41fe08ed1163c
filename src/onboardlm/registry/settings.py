"""The run settings schema: what a registry entry (or a standalone ``--args.yaml-extra`` file) may set.

Every model is strict (``extra="forbid"``, no type coercion), so a misspelt key or a quoted number in
a YAML file is an error rather than a silently ignored or converted value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be zero or a positive integer, got {value}")
    return value


PositiveInt = Annotated[int, AfterValidator(_positive)]
NonNegativeInt = Annotated[int, AfterValidator(_non_negative)]


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SamplingSettings(_StrictModel):
    """How the next token is picked; ``temperature == 0`` means greedy."""

    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: NonNegativeInt = 0
    seed: NonNegativeInt | None = None


class RunSettings(_StrictModel):
    """Everything ``onboardlm run`` takes from the registry: parallelism, shapes, backends, sampling."""

    world_size: PositiveInt = 1
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    #: ``fp8``: a float checkpoint's linears run in FP8 (weights per channel, activations per token);
    #: FP8 checkpoints load in FP8 whatever this says.
    quantize: Literal["none", "fp8"] = "none"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    max_batch_size: PositiveInt = 8
    max_seq_len: PositiveInt = 2048
    max_new_tokens: PositiveInt = 32
    attn_backend: Literal["auto", "reference", "sdpa", "flash"] = "auto"
    compile: bool = False
    cuda_graphs: bool = True
    cuda_graph_batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    prompts: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RunSettings:
        if self.max_new_tokens >= self.max_seq_len:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be smaller than max_seq_len ({self.max_seq_len})"
            )
        sizes = self.cuda_graph_batch_sizes
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"cuda_graph_batch_sizes has repeated values: {sizes}")
        if self.prompts is not None and (not self.prompts or any(not p.strip() for p in self.prompts)):
            raise ValueError("prompts must be a non-empty list of non-empty strings (or left out)")
        return self


@dataclass(frozen=True)
class FieldProblem:
    """One validation failure: the dotted key at fault ('' for the whole settings) and what is wrong."""

    key: str
    message: str
    unknown_key: bool = False


def field_problems(error: ValidationError) -> list[FieldProblem]:
    """Turn a pydantic error into short, key-addressed messages."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        kind = item["type"]
        if kind == "extra_forbidden":
            problems.append(FieldProblem(key, "unknown key", unknown_key=True))
            continue
        if kind in ("value_error", "assertion_error"):
            message = str(item.get("ctx", {}).get("error", item["msg"]))
        else:
            message = f"{item['msg'].rstrip('.')}, got {item.get('input')!r}"
        problems.append(FieldProblem(key, message[0].lower() + message[1:] if message else message))
    return problems


def allowed_keys(dotted_key: str) -> list[str]:
    """The keys allowed at the nesting level of ``dotted_key`` (for 'did you mean' hints)."""
    parts = dotted_key.split(".")[:-1]
    model: type[BaseModel] = RunSettings
    for part in parts:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
