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
    registry_note: str
    matrix_note: str
    cookbook_note: str
    message_file: Path


def make_pr(
    onboarded_dir: Path, into: Path, branch: str | None = None, message_file: Path | None = None
) -> PrResult:
    """Write the onboarding in ``onboarded_dir`` into the checkout ``into`` as a commit on ``branch``
    (default ``onboardlm/<model_type>``) and PR.md into ``message_file`` (default: in ``onboarded_dir``)."""
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
    init_text = checkout.custom_init.read_text(encoding="utf-8")
    new_init = add_model_import(
        init_text, onboarded.module, onboarded.causal_lm_class, str(checkout.custom_init)
    )
    registry = plan_registry(checkout, onboarded)
    matrix = plan_support_matrix(checkout, onboarded)
    cookbook = plan_cookbook(checkout, onboarded, registry)

    files: dict[Path, str] = {model_path: model.text, checkout.custom_init: new_init, test_path: test.text}
    helper = helper_module_source()
    lean_utils = checkout.lean_test_utils
    if not lean_utils.exists() or lean_utils.read_text(encoding="utf-8") != helper:
        files[lean_utils] = helper
    files.update(registry.files)
    files.update(matrix.files)
    files.update(cookbook.files)
    written = [(checkout.relative(p), "modified" if p.exists() else "added") for p in files]

    message = render_pr(
        onboarded, registry, written, checkout.relative(test_path), notes=[matrix.note, cookbook.note]
    )
    title = pr_title(onboarded)
    body = (
        f"{title}\n\nOnboarded by onboardlm from {onboarded.model}: the lean model file, its equivalence "
        f"tests, the test helpers they use and the registry entry. PR.md has the review verdict, the "
        f"test table and the end-to-end run log.\n\n{_sign_off(checkout.root)}\n"
    )
    encoded = {checkout.relative(path): text.encode("utf-8") for path, text in files.items()}
    commit = commit_files(checkout.root, head, branch, encoded, body)
    atomic_write_text(message_path, message)
    return PrResult(
        title=title,
        branch=commit.branch,
        commit=commit.commit,
        base=commit.base,
        switched=commit.switched,
        files=written,
        imports=model.changes + test.changes,
        registry_note=registry.note,
        matrix_note=matrix.note,
        cookbook_note=cookbook.note,
        message_file=message_path,
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
