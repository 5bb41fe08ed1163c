"""F and G rules: what the test file tests, at which level, with which tolerance.

Findings about a missing test point at line 1 of the test file; findings about a test that exists
point at its ``def`` line, or at the comparison or call at fault.
"""

from __future__ import annotations

import ast
from collections.abc import Callable

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Flag, Outcome, rule
from onboardlm.review.model_index import ModelIndex, Role
from onboardlm.review.source import call_name, constant_value, dotted_parts
from onboardlm.review.testfile_index import Comparison, TestCase, TestIndex

#: Small-config bands: field names, lowest and highest accepted value.
SIZE_BANDS = {
    "hidden size": (frozenset({"hidden_size", "n_embd", "d_model"}), 16, 128),
    "layers": (frozenset({"num_hidden_layers", "n_layer", "num_layers", "n_layers"}), 2, 4),  # n_layers: MPT
    "vocab": (frozenset({"vocab_size"}), 256, 2048),
}
#: Config fields that say which kind each layer is: a test config must set them (or use tiny_config).
LAYER_KIND_FIELDS = frozenset(
    {
        "layer_types",
        "mlp_layer_types",
        "mlp_only_layers",
        "decoder_sparse_step",
        "first_k_dense_replace",
        "moe_layer_freq",
        "sliding_window_pattern",
        "no_rope_layers",
        "layers_block_type",
        "attn_layer_period",
        "attn_layer_offset",
        "full_attn_idxs",
        "max_window_layers",
        "num_dense_layers",
    }
)
IDENTICAL, ATTENTION_TOL, MOE_TOL, LAYER_TOL, MODEL_TOL = "identical", 0.10, 0.02, 0.05, 0.05
BLOCK_TOLERANCES: dict[Role, str | float] = {
    Role.NORM: IDENTICAL,
    Role.MLP: IDENTICAL,
    Role.ATTENTION: ATTENTION_TOL,
    Role.MOE: MOE_TOL,
}


def _tests(ctx: ReviewContext) -> TestIndex:
    assert ctx.tests is not None  # the runner fails rules that need tests when there are none
    return ctx.tests


def _meets(case: TestCase, requirement: str | float) -> bool:
    check: Callable[[Comparison], bool] = (
        Comparison.meets_identical if requirement == IDENTICAL else lambda c: c.meets_rmse(float(requirement))
    )
    return any(check(comparison) for comparison in case.comparisons)


def _describe(requirement: str | float) -> str:
    if requirement == IDENTICAL:
        return "assert_close(rtol<=1e-3, atol<=1e-3)"
    return f"assert_rmse_close(rmse_ratio_tol<={requirement})"


def _found(case: TestCase) -> str:
    parts = [f"{c.kind}({c.tol if c.tol is not None else 'default'})" for c in case.comparisons]
    return ", ".join(parts) or "no comparison"


# --------------------------------------------------------------------------------------------------
# F
# --------------------------------------------------------------------------------------------------


@rule(
    "F",
    "F1",
    "a small test config (hidden about 64, 2–4 layers, vocab about 1000) that keeps every layer type of the real model.",
    needs_tests=True,
)
def check_f1(ctx: ReviewContext) -> Outcome:
    """Every size the test file sets (config keywords, dict keys, attribute assignments) is in band.

    Judgement: hidden 16–128, layers 2–4, vocab 256–2048, literals only. A config from
    ``tiny_config(...)`` counts as small and as keeping every layer type (it is built to); otherwise
    each layer-kind field the model file reads (``layer_types``, ``mlp_only_layers``, ...) must be set.
    """
    tests = _tests(ctx)
    settings = _size_settings(tests)
    uses_tiny = any(call_name(c) == "tiny_config" for c in tests.src.calls)
    flags = []
    aliases = _aliases(ctx)
    for kind, (_, low, high) in SIZE_BANDS.items():
        mine = [(name, node) for name, node in settings if name in SIZE_BANDS[kind][0]]
        if not mine and kind == "layers" and _layers_by_list(settings, aliases, low, high):
            continue  # the layer count is the length of the per-layer kind list (NemotronH)
        if not mine and not uses_tiny:
            flags.append(
                tests.src.flag(1, f"the test config sets no {kind} ({low}–{high}) and uses no tiny_config")
            )
        for name, node in mine:
            value = constant_value(node)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                flags.append(
                    tests.src.flag(node, f"{name}={ast.unparse(node)} is not a small literal ({low}–{high})")
                )
    if not uses_tiny:
        set_fields = {name for name, _ in settings}
        set_fields |= {alias for alias, target in aliases.items() if target in set_fields}
        for field in sorted(_layer_kind_fields(ctx.model) - set_fields - _derived_fields(ctx)):
            flags.append(
                tests.src.flag(1, f"the model reads config.{field} but the test config does not set it")
            )
    return Outcome.of(
        flags, "small test config keeping every layer type", tests.src.path, _first_line(settings)
    )


def _first_line(settings: list[tuple[str, ast.expr]]) -> int | None:
    return min((node.lineno for _, node in settings), default=None)


def _size_settings(tests: TestIndex) -> list[tuple[str, ast.expr]]:
    """(field, value) for every size or layer-kind field the test file sets, wherever it sets it."""
    fields = frozenset().union(*(names for names, _, _ in SIZE_BANDS.values())) | LAYER_KIND_FIELDS
    found = []
    for node in ast.walk(tests.src.tree):
        if isinstance(node, ast.Call):
            found += [(kw.arg, kw.value) for kw in node.keywords if kw.arg in fields]
        elif isinstance(node, ast.Dict):
            found += [
                (key.value, value)
                for key, value in zip(node.keys, node.values, strict=True)
                if isinstance(key, ast.Constant) and key.value in fields
            ]
        elif isinstance(node, ast.Assign):
            found += [
                (t.attr, node.value)
                for t in node.targets
                if isinstance(t, ast.Attribute) and t.attr in fields
            ]
    return found


def _aliases(ctx: ReviewContext) -> dict[str, str]:
    """The config class's ``attribute_map`` (NemotronH's ``layer_types`` -> ``layers_block_type``)."""
    if ctx.config is None:
        return {}
    return dict(getattr(type(ctx.config), "attribute_map", {}) or {})


def _layers_by_list(
    settings: list[tuple[str, ast.expr]], aliases: dict[str, str], low: int, high: int
) -> bool:
    """A layer-kind list (or the field a layer-kind name aliases) set to a literal of ``low``–``high``
    items: configs that derive the layer count from it (NemotronH's ``layers_block_type``)."""
    kind_fields = LAYER_KIND_FIELDS | {aliases[name] for name in LAYER_KIND_FIELDS if name in aliases}
    return any(
        name in kind_fields and isinstance(node, ast.List) and low <= len(node.elts) <= high
        for name, node in settings
    )


def _derived_fields(ctx: ReviewContext) -> set[str]:
    """Layer-kind names the config class derives from other fields (a property or an attribute_map
    alias of one, Bamba's ``layer_types`` from ``attn_layer_indices``): set through those fields."""
    if ctx.config is None:
        return set()
    cls = type(ctx.config)
    derived = {name for name in LAYER_KIND_FIELDS if isinstance(getattr(cls, name, None), property)}
    aliases = getattr(cls, "attribute_map", {}) or {}
    return derived | {alias for alias, target in aliases.items() if target in derived}


def _layer_kind_fields(model: ModelIndex) -> set[str]:
    return {
        node.attr
        for node in ast.walk(model.src.tree)
        if isinstance(node, ast.Attribute)
        and node.attr in LAYER_KIND_FIELDS
        and dotted_parts(node.value) is not None
    }


@rule("F", "F2", "every test asserts behaviour; no smoke tests.", needs_tests=True)
def check_f2(ctx: ReviewContext) -> Outcome:
    """A test (with its fixtures and helpers) must assert, call an ``assert*`` helper or expect a raise."""
    tests = _tests(ctx)
    if not tests.tests:
        return Outcome.of([tests.src.flag(1, "the test file has no tests")], "")
    flags = [
        tests.src.flag(case.node, f"{case.name} asserts nothing: a smoke test")
        for case in tests.tests
        if not (case.asserts or case.raises)
    ]
    return Outcome.of(
        flags, f"all {len(tests.tests)} tests assert behaviour", tests.src.path, tests.tests[0].line
    )


@rule("F", "F3", "equivalence is numeric, not only finiteness.", needs_tests=True)
def check_f3(ctx: ReviewContext) -> Outcome:
    """A test that runs a lean model must compare values (assert_close, assert_rmse_close, allclose,
    ``assert a == b`` or ``assert err < tol``); shape, dtype and finiteness checks alone fail.

    Judgement: a test whose point is an expected exception (``pytest.raises``) is exempt.
    """
    tests = _tests(ctx)
    flags = []
    for case in tests.tests:
        runs_model = bool(case.lean_classes or case.exports)
        if not runs_model or case.comparisons or case.raises:
            continue
        where: ast.AST = case.finiteness[0] if case.finiteness else case.node
        what = "only checks finiteness" if case.finiteness else "compares no values"
        flags.append(tests.src.flag(where, f"{case.name} {what}: compare with the reference numerically"))
    return Outcome.of(flags, "equivalence tests compare values numerically", tests.src.path, None)


@rule(
    "F",
    "F4",
    "reference classes come from the installed transformers; re-implementing them in the test fails.",
    needs_tests=True,
)
def check_f4(ctx: ReviewContext) -> Outcome:
    """Judgement: any ``nn.Module`` subclass or class with a ``forward`` defined in the test file is a
    re-implemented reference."""
    tests = _tests(ctx)
    src, flags = tests.src, []
    for node in ast.walk(src.tree):
        if isinstance(node, ast.ClassDef):
            is_module = any((src.qualify(b) or "").endswith("nn.Module") for b in node.bases)
            if is_module or any(isinstance(n, ast.FunctionDef) and n.name == "forward" for n in node.body):
                flags.append(src.flag(node, f"{node.name} re-implements a reference in the test"))
    if not any(case.uses_hf for case in tests.tests):
        flags.append(src.flag(1, "no test uses a reference class from transformers"))
    return Outcome.of(flags, "references come from transformers", src.path, None)


# --------------------------------------------------------------------------------------------------
# G
# --------------------------------------------------------------------------------------------------


def _block_classes(model: ModelIndex) -> list[tuple[ast.ClassDef, Role]]:
    """Blocks that need their own test: attention, norm and MoE classes, and MLPs built by layers."""
    layer_names = {cls.name for cls in model.decoder_layers}
    layer_built = {c.cls for c in model.constructions if c.owner in layer_names}
    blocks = []
    for cls in model.src.classes.values():
        role = model.role(cls)
        if role in (Role.ATTENTION, Role.NORM, Role.MOE) or (role is Role.MLP and cls.name in layer_built):
            blocks.append((cls, role))
    return blocks


def _level_flags(tests: TestIndex, cls: ast.ClassDef, what: str, requirement: str | float) -> list[Flag]:
    """Flags for one class that needs a test against transformers within ``requirement``."""
    cases = tests.covering_class(cls.name)
    vs_hf = [case for case in cases if case.uses_hf]
    if not vs_hf:
        return [tests.src.flag(1, f"no {what} test compares {cls.name} with transformers")]
    if any(_meets(case, requirement) for case in vs_hf):
        return []
    return [
        tests.src.flag(
            case.node, f"{case.name} checks {cls.name} with {_found(case)}; needs {_describe(requirement)}"
        )
        for case in vs_hf
    ]


def _run_flags(ctx: ReviewContext, cases: list[TestCase]) -> list[Flag]:
    """``--run-tests``: the level's tests must have run and passed (skipped ones prove nothing)."""
    run, tests = ctx.test_run, _tests(ctx)
    if run is None:
        return []
    if not run.ran:
        return [tests.src.flag(1, f"the tests could not be run: {run.summary}")]
    flags = []
    for case in cases:
        if case.name in run.failed:
            flags.append(tests.src.flag(case.node, f"{case.name} failed when run: {run.failed[case.name]}"))
        elif case.name in run.skipped:
            flags.append(
                tests.src.flag(case.node, f"{case.name} was skipped when run: {run.skipped[case.name]}")
            )
        elif case.name not in run.passed:
            flags.append(tests.src.flag(case.node, f"{case.name} did not run ({run.summary})"))
    return flags


@rule(
    "G",
    "G1",
    "block equivalence (MLP / MoE / attention / norm) vs HF: identical math `assert_close(rtol=1e-3, atol=1e-3)`; attention RMSE ratio 0.10; MoE 0.02.",
    needs_tests=True,
)
def check_g1(ctx: ReviewContext) -> Outcome:
    """Each attention, norm and MoE class, and each MLP a decoder layer builds, has a test against a
    transformers class with a tolerance at least as tight as the catalogue's."""
    tests, model = _tests(ctx), ctx.model
    blocks = _block_classes(model)
    flags = [
        f
        for cls, role in blocks
        for f in _level_flags(tests, cls, f"{role.value} block", BLOCK_TOLERANCES[role])
    ]
    cases = [case for cls, _ in blocks for case in tests.covering_class(cls.name)]
    flags += _run_flags(ctx, _dedupe(cases))
    names = ", ".join(cls.name for cls, _ in blocks)
    return Outcome.of(flags, f"block tests for {names}", tests.src.path, None)


def _dedupe(cases: list[TestCase]) -> list[TestCase]:
    seen: dict[str, TestCase] = {}
    for case in cases:
        seen.setdefault(case.name, case)
    return list(seen.values())


@rule("G", "G2", "decoder-layer equivalence for each distinct layer type, RMSE ratio 0.05.", needs_tests=True)
def check_g2(ctx: ReviewContext) -> Outcome:
    """Judgement: a layer class that picks its parts by layer kind in ``__init__`` (one attribute
    built as different classes) must be tested with more than one build: parametrized, from a
    fixture with params, or in a loop."""
    tests, model = _tests(ctx), ctx.model
    layers = model.decoder_layers
    if not layers:
        return Outcome.of(
            [ctx.src.flag(model.causal_lm or 1, "no decoder-layer class found (no ModuleList of layers)")], ""
        )
    flags = [f for cls in layers for f in _level_flags(tests, cls, "decoder-layer", LAYER_TOL)]
    for cls in layers:
        cases = tests.covering_class(cls.name)
        if _picks_by_kind(model, cls) and cases and not any(case.varied for case in cases):
            flags.append(
                tests.src.flag(cases[0].node, f"{cls.name} has several layer kinds; the test builds one")
            )
    flags += _run_flags(ctx, _dedupe([c for cls in layers for c in tests.covering_class(cls.name)]))
    return Outcome.of(
        flags, f"decoder-layer tests for {', '.join(c.name for c in layers)}", tests.src.path, None
    )


def _picks_by_kind(model: ModelIndex, cls: ast.ClassDef) -> bool:
    built: dict[str, set[str]] = {}
    for construction in model.built_by(cls.name):
        built.setdefault(construction.attr, set()).add(construction.cls)
    return any(len(classes) > 1 for classes in built.values())


@rule("G", "G3", "full-model logits, RMSE ratio 0.05, on CPU.", needs_tests=True)
def check_g3(ctx: ReviewContext) -> Outcome:
    """A test reaching the lean causal LM and a transformers model compares logits within 0.05 (or
    element-wise within 1e-3); ``.cuda()`` or ``"cuda"`` in such a test fails "on CPU"."""
    tests, causal_lm = _tests(ctx), ctx.model.causal_lm
    assert causal_lm is not None
    flags = _level_flags(tests, causal_lm, "full-model", MODEL_TOL)
    cases = [case for case in tests.covering_class(causal_lm.name) if case.uses_hf]
    flags += [
        tests.src.flag(node, f"{case.name} moves work to CUDA: the test must run on CPU")
        for case in cases
        for node in case.cuda
    ]
    flags += _run_flags(ctx, cases)
    return Outcome.of(
        flags, f"full-model logits of {causal_lm.name} vs transformers on CPU", tests.src.path, None
    )


def _export_cases(tests: TestIndex) -> list[TestCase]:
    return [case for case in tests.tests if case.exports]


@rule(
    "G",
    "G4",
    "export with `torch_export_to_gm` and dynamic batch and sequence; exported output equals eager.",
    needs_tests=True,
)
def check_g4(ctx: ReviewContext) -> Outcome:
    """Judgement: dynamic means some input maps dims 0 and 1 to ``Dim`` values (or the shared
    ``causal_lm_dynamic_shapes()``); equality means a numeric comparison of the graph's output."""
    tests = _tests(ctx)
    cases = _export_cases(tests)
    if not cases:
        return Outcome.of([tests.src.flag(1, "no export test (torch_export_to_gm)")], "")
    flags = []
    if not any(e.dynamic for case in cases for e in case.exports):
        flags += [
            tests.src.flag(e.node, "exported without dynamic batch and sequence (Dim for dims 0 and 1)")
            for case in cases
            for e in case.exports
        ]
    if not any(e.compared for case in cases for e in case.exports):
        flags += [
            tests.src.flag(e.node, "the exported graph's output is never compared with eager")
            for case in cases
            for e in case.exports
        ]
    flags += _run_flags(ctx, cases)
    return Outcome.of(
        flags, "exported with dynamic batch and sequence, output equals eager", tests.src.path, cases[0].line
    )


@rule("G", "G5", "the exported graph runs a second, different shape.", needs_tests=True)
def check_g5(ctx: ReviewContext) -> Outcome:
    """Judgement: the graph is called with two different argument lists, or called inside a loop."""
    tests = _tests(ctx)
    cases = _export_cases(tests)
    if not cases:
        return Outcome.of([tests.src.flag(1, "no export test, so no second shape")], "")
    flags = []
    if not any(e.shapes >= 2 for case in cases for e in case.exports):
        flags = [
            tests.src.flag(e.node, "the exported graph is run with one input only")
            for case in cases
            for e in case.exports
        ]
    flags += _run_flags(ctx, cases)
    return Outcome.of(flags, "the exported graph runs a second shape", tests.src.path, cases[0].line)


RULES = (check_f1, check_f2, check_f3, check_f4, check_g1, check_g2, check_g3, check_g4, check_g5)
