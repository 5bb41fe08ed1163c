"""The git side of ``onboardlm pr``: checks on the checkout, and one commit on a new branch.

The commit is built with git's plumbing in a temporary index (blobs, tree, commit), and the branch ref
is created last, refusing to overwrite one: until then the checkout is untouched, and on any failure
nothing but unreachable objects remain. Then the checkout switches to the branch, which, the tree
being clean, only adds the committed files.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from onboardlm.pr.layout import PrError


@dataclass(frozen=True)
class CommitResult:
    branch: str
    commit: str
    base: str  # the commit the branch starts from
    switched: bool


def git(root: Path, *args: str, input: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run ``git -C root args``; its stdout, stripped. A failure raises :class:`PrError` with git's message."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
    except FileNotFoundError:
        raise PrError("git", "not found on PATH") from None
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
        raise PrError(f"git {args[0]}", message)
    return done.stdout.strip()


def check_checkout(root: Path, branch: str) -> str:
    """Refuse a folder that is not the top of a git work tree, one without a commit, a dirty one, a bad
    branch name and an existing branch; return the HEAD commit."""
    try:
        top = git(root, "rev-parse", "--show-toplevel")
    except PrError:
        raise PrError(str(root), "not a git checkout") from None
    if Path(top).resolve() != root.resolve():
        raise PrError(str(root), f"is inside the git checkout {top}, not its top folder")
    try:
        head = git(root, "rev-parse", "--verify", "HEAD^{commit}")
    except PrError:
        raise PrError(str(root), "the checkout has no commit yet") from None
    dirty = git(root, "status", "--porcelain", "--untracked-files=normal")
    if dirty:
        first = dirty.splitlines()[0].strip()
        count = len(dirty.splitlines())
        raise PrError(
            str(root), f"the checkout is dirty ({count} change(s), first: {first})", "commit or stash them"
        )
    try:
        git(root, "check-ref-format", "--branch", branch)
    except PrError:
        raise PrError(branch, "not a valid branch name") from None
    if (
        subprocess.run(
            ["git", "-C", str(root), "show-ref", "--verify", "--quiet", f"refs/heads/{branch}"], check=False
        ).returncode
        == 0
    ):
        raise PrError(branch, f"branch exists already in {root}", "choose another with --branch")
    return head


def commit_files(
    root: Path, head: str, branch: str, files: Mapping[str, bytes], message: str
) -> CommitResult:
    """Commit ``files`` (checkout-relative path -> content) on top of ``head`` as new branch ``branch``,
    then switch the checkout to it."""
    with tempfile.TemporaryDirectory(prefix="onboardlm-pr-") as scratch:
        env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        git(root, "read-tree", head, env=env)
        for path, data in sorted(files.items()):
            blob = _hash_object(root, data)
            mode = _mode(root, head, path)
            git(root, "update-index", "--add", "--cacheinfo", f"{mode},{blob},{path}", env=env)
        tree = git(root, "write-tree", env=env)
    commit = git(root, "commit-tree", tree, "-p", head, "-F", "-", input=message)
    git(root, "update-ref", f"refs/heads/{branch}", commit, "0" * 40)  # fails if the branch appeared
    try:
        git(root, "switch", "--quiet", branch)
        switched = True
    except PrError:
        switched = False
    return CommitResult(branch, commit, head, switched)


def _hash_object(root: Path, data: bytes) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), "hash-object", "-w", "--stdin"], input=data, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise PrError("git hash-object", " ".join(done.stderr.decode(errors="replace").split()))
    return done.stdout.decode().strip()


def _mode(root: Path, head: str, path: str) -> str:
    """The file mode ``path`` has at ``head`` (kept), else a plain file's."""
    listed = git(root, "ls-tree", head, "--", path)
    return listed.split()[0] if listed else "100644"
