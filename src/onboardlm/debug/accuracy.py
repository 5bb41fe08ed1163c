"""Accuracy bisection: the lean model against transformers, module by module, on the same input.

Lean files name their modules as the checkpoint names its keys, so the lean model and the transformers
model share module names. :func:`compare_with_reference` hooks every module the two have in common,
runs both on the same token ids, and measures the RMSE ratio ``‖lean − hf‖₂ / ‖hf‖₂`` of each
module's output (its first tensor) in the order the lean model finished them; the first one past the
tolerance is where the two diverge (a bug upstream of it would have shown earlier). It also gives the
logits' RMSE ratio and the greedy top-1 agreement per position. :func:`check_accuracy` loads both
models for a model name as ``onboardlm run`` does (registry name, directory, .gguf, model_type): the
transformers model from the checkpoint (or random weights when there is none), the lean model filled
from it through the real loading path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from onboardlm.errors import OnboardlmError
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.testing.capture import first_tensor
from onboardlm.testing.metrics import rmse_ratio
from onboardlm.testing.random_init import randomize_constant_tensors
from onboardlm.testing.transfer import transfer_weights

#: Default RMSE-ratio tolerance per dtype: fp32 as the generated tests' (issue 18), else the seed's 0.05.
DEFAULT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.05}
DEFAULT_PROMPT = "The capital of France is"
RANDOM_TOKENS = 16


@dataclass(frozen=True)
class ModuleResult:
    """One module both models have: its output shape and RMSE ratio (None when not comparable)."""

    name: str
    shape: tuple[int, ...]
    ratio: float | None
    past_tolerance: bool
    note: str = ""


@dataclass
class AccuracyReport:
    """The comparison of the lean model with transformers on one input."""

    model: str
    lean_class: str
    reference_class: str
    dtype: str
    tolerance: float
    num_tokens: int
    input_note: str
    weights: str
    modules: list[ModuleResult] = field(default_factory=list)
    logits_ratio: float = 0.0
    top1_agreement: float = 0.0
    only_lean: list[str] = field(default_factory=list)
    only_reference: list[str] = field(default_factory=list)

    @property
    def first_past_tolerance(self) -> ModuleResult | None:
        return next((m for m in self.modules if m.past_tolerance), None)

    @property
    def passed(self) -> bool:
        return self.first_past_tolerance is None and self.logits_ratio <= self.tolerance


@contextmanager
def _outputs_in_order(model: nn.Module, names: set[str]) -> Iterator[dict[str, Any]]:
    """Record each named module's first output (a detached fp32 copy of its first tensor), keyed by name
    in the order the modules finish."""
    outputs: dict[str, Any] = {}
    handles = []
    for name, module in model.named_modules():
        if name not in names:
            continue

        def hook(_: nn.Module, __: Any, output: Any, name: str = name) -> None:
            if name in outputs:
                return
            try:
                outputs[name] = first_tensor(output).detach().float().clone()
            except TypeError:
                outputs[name] = None

        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _logits(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else first_tensor(output)
    return logits.detach().float()


def compare_with_reference(
    lean: nn.Module, reference: nn.Module, input_ids: torch.Tensor, tolerance: float
) -> tuple[list[ModuleResult], torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Module results in the lean model's finishing order (modules it never calls, such as linears whose
    weights its ops read, are left out), both logits, and the module names only one model has."""
    lean_names = {name for name, _ in lean.named_modules() if name}
    reference_names = {name for name, _ in reference.named_modules() if name}
    shared = lean_names & reference_names
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    with torch.no_grad():
        with _outputs_in_order(lean, shared) as lean_out:
            lean_logits = _logits(lean(input_ids=input_ids, position_ids=positions))
        with _outputs_in_order(reference, shared) as ref_out:
            try:
                output = reference(input_ids=input_ids, position_ids=positions, use_cache=False)
            except Exception as err:
                first = (str(err).strip().splitlines() or [""])[0]
                raise OnboardlmError(
                    type(reference).__name__, f"transformers' forward failed: {type(err).__name__}: {first}"
                ) from None
            ref_logits = _logits(output)
    results = []
    for name, actual in lean_out.items():
        expected = ref_out.get(name)
        if actual is None or expected is None:
            results.append(ModuleResult(name, (), None, False, "output is not a tensor"))
        elif actual.shape != expected.shape:
            note = f"shapes differ: lean {list(actual.shape)}, transformers {list(expected.shape)}"
            results.append(ModuleResult(name, tuple(actual.shape), None, False, note))
        else:
            ratio = rmse_ratio(actual, expected)
            results.append(ModuleResult(name, tuple(actual.shape), ratio, not ratio <= tolerance))
    return results, lean_logits, ref_logits, sorted(lean_names - shared), sorted(reference_names - shared)


def top1_agreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The fraction of positions where the two logits pick the same greedy token."""
    return float((actual.argmax(-1) == expected.argmax(-1)).float().mean())


# --------------------------------------------------------------------------------------------------
# loading both models for a model name
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedPair:
    factory: AutoModelForCausalLMFactory
    lean: nn.Module
    reference: nn.Module
    weights: str


def load_pair(
    model: str | None, dtype: torch.dtype, model_kwargs: dict[str, Any] | None = None
) -> LoadedPair:
    """The lean model and the transformers model for ``model`` (as ``onboardlm run`` names it), with the
    same weights: the checkpoint's, else random ones (constant tensors such as norm weights randomised)."""
    from onboardlm.runtime.runner import model_location

    factory = AutoModelForCausalLMFactory(model_location(model), model_kwargs)
    lean_cls, is_custom = factory.model_class()
    config = factory.config
    if not is_custom or lean_cls is None:
        raise OnboardlmError(
            model or "the default model",
            f"no lean model is registered for {type(config).__name__}",
            "onboard it first, or pass --custom-model-dir with its model file",
        )
    config._attn_implementation = "eager"
    reference = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    weights = factory.source.weights
    if weights is None:
        torch.manual_seed(0)
        randomize_constant_tensors(reference)
        description = "random weights (no checkpoint), norm weights randomised"
    else:
        _load_reference(factory, reference, dtype)
        description = ", ".join(str(f) for f in weights.files)
    lean = factory.build_model("cpu", dtype, init_weights=False)
    transfer_weights(reference, lean)
    return LoadedPair(factory, lean.eval(), reference, description)


def _load_reference(factory: AutoModelForCausalLMFactory, reference: nn.Module, dtype: torch.dtype) -> None:
    """Fill the transformers model from the checkpoint (converted by transformers' mapping if needed)."""
    location = factory.source.weights
    assert location is not None
    tied = {"lm_head.weight"} if getattr(factory.config, "tie_word_embeddings", False) else set()
    state_dict, _ = factory.read_checkpoint(location, reference, dtype)
    missing, _unexpected = reference.load_state_dict(state_dict, strict=False)
    if set(missing) - tied:
        state_dict, _ = factory.read_converted(location, reference, dtype)
        missing, _unexpected = reference.load_state_dict(state_dict, strict=False)
    if set(missing) - tied:
        raise OnboardlmError(
            ", ".join(str(f) for f in location.files),
            f"the checkpoint does not fill transformers' model ({len(missing)} missing, e.g. {missing[0]})",
        )
    if tied and hasattr(reference, "tie_weights"):
        reference.tie_weights()


def input_ids_for(factory: AutoModelForCausalLMFactory, prompt: str | None) -> tuple[torch.Tensor, str]:
    """Token ids ``[1, s]`` of ``prompt`` (default :data:`DEFAULT_PROMPT`) with the model's tokenizer;
    without a tokenizer, fixed random ids."""
    if factory.source.has_tokenizer:
        text = prompt or DEFAULT_PROMPT
        ids = factory.tokenizer()(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            raise OnboardlmError(
                repr(text), f"gives {ids.shape[1]} token(s)", "use a prompt of two or more tokens"
            )
        return ids, f"prompt {text!r}, {ids.shape[1]} tokens"
    vocab = int(factory.config.vocab_size)
    ids = torch.randint(0, vocab, (1, RANDOM_TOKENS), generator=torch.Generator().manual_seed(0))
    note = f"{RANDOM_TOKENS} random token ids (the model has no tokenizer"
    return ids, note + (", --prompt ignored)" if prompt else ")")


def check_accuracy(
    model: str | None,
    *,
    prompt: str | None = None,
    dtype: torch.dtype = torch.float32,
    tolerance: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[AccuracyReport, LoadedPair, torch.Tensor]:
    """Compare ``model``'s lean model with transformers; returns the report, both models and the input."""
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    pair = load_pair(model, dtype, model_kwargs)
    input_ids, note = input_ids_for(pair.factory, prompt)
    modules, lean_logits, ref_logits, only_lean, only_ref = compare_with_reference(
        pair.lean, pair.reference, input_ids, tolerance
    )
    report = AccuracyReport(
        model=model or "the default model",
        lean_class=f"{type(pair.lean).__module__}.{type(pair.lean).__name__}",
        reference_class=f"{type(pair.reference).__module__}.{type(pair.reference).__name__}",
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tolerance,
        num_tokens=int(input_ids.shape[1]),
        input_note=note,
        weights=pair.weights,
        modules=modules,
        logits_ratio=rmse_ratio(lean_logits, ref_logits),
        top1_agreement=top1_agreement(lean_logits, ref_logits),
        only_lean=only_lean,
        only_reference=only_ref,
    )
    return report, pair, input_ids
