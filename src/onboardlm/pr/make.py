"""``onboardlm pr``: an onboarded model as one commit on a new branch of a TensorRT-LLM checkout.

Everything is read, checked and rendered in memory first (the onboarding, the checkout's layout,
its git state, each rewritten file); only then is the commit made (:mod:`onboardlm.pr.git`) and PR.md
written. Any refusal before that leaves the checkout and the onboarding folder as they were.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from onboardlm.pr.cookbook import plan_cookbook
from onboardlm.pr.git import check_checkout, commit_files, git
from onboardlm.pr.helpers import helper_module_source
from onboardlm.pr.imports import rewrite_imports
from onboardlm.pr.init_edit import add_model_import
from onboardlm.pr.layout import PrError, TrtllmCheckout
from onboardlm.pr.message import pr_title, render_pr
from onboardlm.pr.onboarded import read_onboarded
from onboardlm.pr.registry import plan_registry
from onboardlm.pr.support_matrix import plan_support_matrix
from onboardlm.registry.atomic import atomic_write_text

MESSAGE_NAME = "PR.md"


@dataclass(frozen=True)
class PrResult:
    title: str
    branch: str
    commit: str
    base: str
    switched: bool  # the checkout is on the new branch
    files: list[tuple[str, str]]  # (checkout-relative path, "added" | "modified")
    imports: list[tuple[str, str]]  # (old, new) import lines of the model and test files
    notes: dict[str, str]  # registry, support matrix, cookbook: what was done and why
    message_file: Path


@dataclass(frozen=True)
class PrPlan:
    """Everything the PR writes, rendered and checked, before anything is written."""

    checkout: TrtllmCheckout
    head: str
    branch: str
    files: dict[Path, str]
    written: list[tuple[str, str]]  # (checkout-relative path, "added" | "modified")
    imports: list[tuple[str, str]]
    notes: dict[str, str]  # registry, support matrix, cookbook: what was done and why
    title: str
    commit_message: str
    message: str  # PR.md
    message_file: Path


def plan_pr(
    onboarded_dir: Path, into: Path, branch: str | None = None, message_file: Path | None = None
) -> PrPlan:
    """Read and check the onboarding, the checkout and its git state, and render every file; raises
    :class:`PrError` on a bad input, having written nothing."""
    onboarded = read_onboarded(onboarded_dir)
    checkout = TrtllmCheckout.at(into)
    branch = branch or f"onboardlm/{onboarded.model_type}"
    head = check_checkout(checkout.root, branch)
    message_path = _message_path(message_file or onboarded.folder / MESSAGE_NAME, checkout)

    model_path, test_path = checkout.model_file(onboarded.module), checkout.test_file(onboarded.test_name)
    for path in (model_path, test_path):
        if path.exists():
            raise PrError(
                str(path), "exists already", "onboardlm pr adds new models; update an existing one by hand"
            )
    model = rewrite_imports(onboarded.model_text, str(onboarded.folder / f"{onboarded.module}.py"))
    test = rewrite_imports(
        onboarded.test_text, str(onboarded.folder / onboarded.test_name), local_modules=[onboarded.module]
    )
    init = checkout.custom_init
    new_init = add_model_import(
        init.read_text(encoding="utf-8"), onboarded.module, onboarded.causal_lm_class, str(init)
    )
    registry = plan_registry(checkout, onboarded)
    matrix = plan_support_matrix(checkout, onboarded)
    cookbook = plan_cookbook(checkout, onboarded, registry)

    files: dict[Path, str] = {model_path: model.text, init: new_init, test_path: test.text}
    helper = helper_module_source()
    if (
        not checkout.lean_test_utils.exists()
        or checkout.lean_test_utils.read_text(encoding="utf-8") != helper
    ):
        files[checkout.lean_test_utils] = helper
    files.update(registry.files)
    files.update(matrix.files)
    files.update(cookbook.files)
    written = [(checkout.relative(p), "modified" if p.exists() else "added") for p in files]

    title = pr_title(onboarded)
    commit_message = (
        f"{title}\n\nOnboarded by onboardlm from {onboarded.model}: the lean model file, its equivalence "
        f"tests, the test helpers they use and the registry entry. PR.md has the review verdict, the "
        f"test table and the end-to-end run log.\n\n{_sign_off(checkout.root)}\n"
    )
    message = render_pr(
        onboarded, registry, written, checkout.relative(test_path), notes=[matrix.note, cookbook.note]
    )
    return PrPlan(
        checkout=checkout,
        head=head,
        branch=branch,
        files=files,
        written=written,
        imports=model.changes + test.changes,
        notes={"registry": registry.note, "support matrix": matrix.note, "cookbook": cookbook.note},
        title=title,
        commit_message=commit_message,
        message=message,
        message_file=message_path,
    )


def make_pr(
    onboarded_dir: Path, into: Path, branch: str | None = None, message_file: Path | None = None
) -> PrResult:
    """Write the onboarding in ``onboarded_dir`` into the checkout ``into`` as a commit on ``branch``
    (default ``onboardlm/<model_type>``) and PR.md into ``message_file`` (default: in ``onboarded_dir``)."""
    plan = plan_pr(onboarded_dir, into, branch, message_file)
    root = plan.checkout.root
    encoded = {plan.checkout.relative(path): text.encode("utf-8") for path, text in plan.files.items()}
    commit = commit_files(root, plan.head, plan.branch, encoded, plan.commit_message)
    atomic_write_text(plan.message_file, plan.message)
    return PrResult(
        title=plan.title,
        branch=commit.branch,
        commit=commit.commit,
        base=commit.base,
        switched=commit.switched,
        files=plan.written,
        imports=plan.imports,
        notes=plan.notes,
        message_file=plan.message_file,
    )


def _message_path(path: Path, checkout: TrtllmCheckout) -> Path:
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise PrError(str(path), "is a folder; --message-file takes a file path")
    if not path.parent.is_dir():
        raise PrError(str(path), "its folder does not exist")
    if path.is_relative_to(checkout.root):
        raise PrError(str(path), "is inside the checkout; write PR.md outside it")
    return path


def _sign_off(root: Path) -> str:
    """``Signed-off-by:`` with git's author identity (TensorRT-LLM asks for DCO sign-off)."""
    ident = git(root, "var", "GIT_AUTHOR_IDENT")
    return "Signed-off-by: " + re.sub(r"\s+\d+\s+[+-]\d{4}$", "", ident)
