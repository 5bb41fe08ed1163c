"""``onboardlm pr`` against a skeleton TensorRT-LLM checkout: files in place, imports rewritten, op calls
unchanged, registry edited round trip, one commit on a new branch, PR.md; bad inputs write nothing."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
from pr_support import HUB_ID, MODELS_YAML, PROMPTS, TESTS, git, run_pr

from onboardlm.pr.layout import CUSTOM_MODELS, MODEL_TESTS, REGISTRY, TEST_UTILS

MODEL = f"{CUSTOM_MODELS}/modeling_llama.py"
TEST = f"{MODEL_TESTS}/test_llama_modeling.py"
HELPERS = f"{TEST_UTILS}/_lean_model_test_utils.py"
INIT = f"{CUSTOM_MODELS}/__init__.py"
MODELS = f"{REGISTRY}/models.yaml"
CONFIG = f"{REGISTRY}/configs/llama-3.2-1b-instruct.yaml"
MATRIX = "docs/source/models/supported-models.md"
COOKBOOK = "examples/auto_deploy/cookbooks/llama_3.2_1b_instruct_trtllm_cookbook.ipynb"


def _onboardlm_imports(text: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "onboardlm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "onboardlm":
            found.append(node.module)
    return found


def _code_without_imports(text: str) -> list[str]:
    body = ast.parse(text).body
    return [ast.dump(n) for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))]


def _op_calls(text: str) -> list[str]:
    return [
        ast.unparse(n)
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("torch.ops.auto_deploy.")
    ]


@pytest.fixture
def made(onboarded: Path, checkout: Path) -> tuple[Path, Path, str]:
    base = git(checkout, "rev-parse", "HEAD")
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 0, output
    return onboarded, checkout, base


def test_one_commit_on_a_new_branch_with_every_file(made) -> None:
    _, checkout, base = made
    assert git(checkout, "branch", "--show-current") == "onboardlm/llama"
    assert git(checkout, "rev-parse", "HEAD~1") == base
    assert git(checkout, "rev-parse", "main") == base  # the base branch is untouched
    changed = git(checkout, "diff", "--name-status", "HEAD~1", "HEAD").splitlines()
    assert sorted(changed) == sorted(
        [
            f"A\t{MODEL}",
            f"M\t{INIT}",
            f"A\t{TEST}",
            f"A\t{HELPERS}",
            f"M\t{MODELS}",
            f"A\t{CONFIG}",
            f"M\t{MATRIX}",
            f"A\t{COOKBOOK}",
        ]
    )
    assert git(checkout, "status", "--porcelain") == ""  # the working tree is the commit
    for path in (MODEL, TEST, HELPERS, CONFIG):
        assert (checkout / path).is_file()
    message = git(checkout, "log", "-1", "--format=%B")
    assert message.startswith("[None][feat] AutoDeploy: add LlamaForCausalLM (llama) lean model")
    assert "Signed-off-by: Test Author <author@example.com>" in message


def test_written_python_imports_nothing_from_onboardlm(made) -> None:
    _, checkout, _ = made
    for path in (MODEL, TEST, HELPERS, INIT):
        text = (checkout / path).read_text()
        assert _onboardlm_imports(text) == [], path
    test = (checkout / TEST).read_text()
    assert "from _model_test_utils import assert_rmse_close" in test
    assert "from _lean_model_test_utils import randomize_constant_tensors, transfer_weights" in test
    assert "from tensorrt_llm._torch.auto_deploy.models.custom import modeling_llama as lean" in test
    assert "from tensorrt_llm._torch.auto_deploy.export import torch_export_to_gm" in test


def test_the_model_file_changes_only_its_imports(made) -> None:
    onboarded, checkout, _ = made
    original = (onboarded / "modeling_llama.py").read_text()
    written = (checkout / MODEL).read_text()
    assert _code_without_imports(written) == _code_without_imports(original)
    assert _op_calls(written) == _op_calls(original) and len(_op_calls(written)) >= 3
    assert "import tensorrt_llm._torch.auto_deploy.custom_ops  # noqa: F401" in written
    assert "from tensorrt_llm._torch.auto_deploy.models.hf import AutoModelForCausalLMFactory" in written
    removed = [line for line in original.splitlines() if line not in written.splitlines()]
    assert all("onboardlm" in line for line in removed), removed


def test_the_init_imports_the_model_and_exports_its_class(made) -> None:
    _, checkout, _ = made
    text = (checkout / INIT).read_text()
    assert text.splitlines()[:3] == [
        "from .modeling_cohere import CohereForCausalLM",
        "from .modeling_llama import LlamaForCausalLM",
        "from .modeling_mistral import MistralForCausalLM",
    ]
    tree = ast.parse(text)
    exported = next(n.value for n in tree.body if isinstance(n, ast.Assign))
    assert ast.literal_eval(exported) == ("CohereForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")


def test_the_registry_is_edited_round_trip(made) -> None:
    _, checkout, _ = made
    text = (checkout / MODELS).read_text()
    assert text.startswith(MODELS_YAML)  # every byte, comment and entry before it kept
    assert text[len(MODELS_YAML) :] == (
        f"- name: {HUB_ID}\n"
        "  config_id: llama_3_2_1b_instruct\n"
        "  yaml_extra: ['dashboard_default.yaml', 'world_size_1.yaml', 'llama-3.2-1b-instruct.yaml']\n"
    )
    config = (checkout / CONFIG).read_text()
    assert config.startswith(f"# Standalone AutoDeploy config for {HUB_ID}")
    assert "runtime: trtllm" in config and "world_size: 1" in config and "max_batch_size: 8" in config


def test_the_support_matrix_gets_a_sorted_aligned_row_with_the_autodeploy_footnote(made) -> None:
    _, checkout, _ = made
    lines = (checkout / MATRIX).read_text().splitlines()
    table = [line for line in lines if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == [
        "Cohere2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
    ]
    row = table[1]
    assert row == (
        f"| {'`LlamaForCausalLM` [^5]':<36} | {'Llama-3.2-1B-Instruct':<34} | {'`' + HUB_ID + '`':<44} |"
    )
    assert len(row) == len(table[0])


def test_a_class_already_in_the_matrix_keeps_its_row(onboarded: Path, checkout: Path) -> None:
    matrix = checkout / MATRIX
    matrix.write_text(matrix.read_text().replace("`MistralForCausalLM`", "`LlamaForCausalLM`  "))
    git(checkout, "commit", "-qam", "llama listed")
    before = matrix.read_text()
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 0, output
    assert "support matrix: LlamaForCausalLM is in the support matrix already (row kept)" in output
    assert matrix.read_text() == before


TRAILING = """\
- name: DeepInfra/GLM-4.7-Flash-NVFP4
  yaml_extra: ['glm-4.7-flash.yaml']
# OOM during AutoDeploy run.
# - name: nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16
#   yaml_extra: ['dashboard_default.yaml', 'world_size_8.yaml',
#     ]
"""


def test_an_entry_without_config_id_before_trailing_comments(onboarded: Path, checkout: Path) -> None:
    models = checkout / MODELS
    models.write_text(MODELS_YAML + TRAILING)
    git(checkout, "commit", "-qam", "more entries")
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 0, output
    new = (
        f"- name: {HUB_ID}\n"
        "  yaml_extra: ['dashboard_default.yaml', 'world_size_1.yaml', 'llama-3.2-1b-instruct.yaml']\n"
    )
    head, comments = TRAILING.split("# OOM", 1)
    assert models.read_text() == MODELS_YAML + head + new + "# OOM" + comments


def test_the_cookbook_serves_the_registry_config_and_has_no_outputs(made) -> None:
    _, checkout, _ = made
    notebook = json.loads((checkout / COOKBOOK).read_text())
    assert notebook["nbformat"] == 4
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    text = "".join("".join(cell["source"]) for cell in notebook["cells"])
    assert f"--extra_llm_api_options {REGISTRY}/configs/llama-3.2-1b-instruct.yaml" in text
    assert f'MODEL_ID = "{HUB_ID}"' in text and f'trtllm-serve "{HUB_ID}"' in text
    for cell in code:
        ast.parse("".join(line for line in cell["source"] if not line.startswith("%")))


def test_pr_md_has_title_review_tests_commands_and_the_verbatim_run(made) -> None:
    onboarded, _, _ = made
    text = (onboarded / "PR.md").read_text()
    assert text.startswith("# [None][feat] AutoDeploy: add LlamaForCausalLM (llama) lean model\n")
    assert re.search(r"REVIEW RESULT: PASS, (\d+)/\1 rules passed", text)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) == len(TESTS) and all(row.endswith("| PASS |") for row in rows)
    assert f"pytest {TEST} -v" in text
    assert (
        f"python examples/auto_deploy/build_and_run_ad.py --model {HUB_ID} "
        f"--args.yaml-extra examples/auto_deploy/model_registry/configs/llama-3.2-1b-instruct.yaml"
    ) in text
    full = [p for p in PROMPTS if p.run == "full"]
    log = "\n".join(f"[PROMPT {p.index}] {p.prompt}: {p.output}" for p in full)
    assert f"## End-to-end run (full), verbatim\n\n```\n{log}\n```" in text
    assert "garbled reduced output" not in text  # only the last run
    assert f"`{CONFIG}` (added)" in text and f"`{INIT}` (modified)" in text


def test_the_helper_module_is_onboardlm_s_own_source(made) -> None:
    _, checkout, _ = made
    import inspect

    from onboardlm.testing import capture, random_init, transfer

    text = (checkout / HELPERS).read_text()
    for function in (
        random_init.randomize_constant_tensors,
        random_init.unit_embeddings,
        transfer.transfer_weights,
        capture.record_calls,
        capture.Call,
    ):
        assert inspect.getsource(function) in text, function.__name__
    namespace: dict[str, object] = {}
    exec(compile(text, HELPERS, "exec"), namespace)
    assert sorted(namespace["__all__"]) == sorted(
        [
            "Call",
            "cos_sin_tables",
            "first_tensor",
            "missing_paths",
            "randomize_constant_tensors",
            "record_calls",
            "rmse_ratio",
            "text_positions",
            "transfer_weights",
            "unit_embeddings",
        ]
    )


def test_message_file_and_branch_options(onboarded: Path, checkout: Path, tmp_path: Path) -> None:
    message = tmp_path / "message.md"
    code, output = run_pr(
        str(onboarded), "--into", str(checkout), "--branch", "add-llama", "--message-file", str(message)
    )
    assert code == 0, output
    assert git(checkout, "branch", "--show-current") == "add-llama"
    assert message.read_text().startswith("# [None][feat]")
    assert not (onboarded / "PR.md").exists()


# ---------------------------------------------------------------- bad inputs


def _snapshot(*roots: Path) -> dict[str, bytes]:
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                files[str(path)] = path.read_bytes()
    return files


def _break(kind: str, onboarded: Path, checkout: Path) -> tuple[list[str], str]:
    """Make input ``kind`` bad; return the command line and the expected message (a regex)."""
    args = [str(onboarded), "--into", str(checkout)]
    if kind == "not-onboarded":
        (onboarded / "report.json").unlink()
        return args, "not an onboarding output: no report.json in it"
    if kind == "failed-onboarding":
        report = json.loads((onboarded / "report.json").read_text())
        report["status"] = "fail"
        report["phases"][4]["status"] = "fail"
        (onboarded / "report.json").write_text(json.dumps(report))
        return args, r"the onboarding did not pass \(failed: verify\)"
    if kind == "missing-model-file":
        (onboarded / "modeling_llama.py").unlink()
        return args, "not a complete onboarding output: modeling_llama.py is missing"
    if kind == "not-a-checkout":
        return [
            str(onboarded),
            "--into",
            str(onboarded),
        ], "not a TensorRT-LLM checkout: tensorrt_llm/.* is missing"
    if kind == "no-registry":
        (checkout / MODELS).unlink()
        git(checkout, "commit", "-qam", "drop models.yaml")
        return args, "not a TensorRT-LLM checkout: examples/auto_deploy/model_registry/models.yaml is missing"
    if kind == "dirty":
        (checkout / INIT).write_text((checkout / INIT).read_text() + "# local edit\n")
        return args, r"the checkout is dirty \(1 change\(s\), first: M .*__init__.py\)"
    if kind == "untracked":
        (checkout / "scratch.txt").write_text("x")
        return args, r"the checkout is dirty \(1 change\(s\), first: \?\? scratch.txt\)"
    if kind == "existing-branch":
        git(checkout, "branch", "onboardlm/llama")
        return args, "onboardlm/llama: branch exists already"
    if kind == "bad-branch-name":
        return [*args, "--branch", "no..dots"], "no..dots: not a valid branch name"
    if kind == "model-exists":
        (checkout / MODEL).write_text("# someone else's llama\n")
        git(checkout, "add", "-A")
        git(checkout, "commit", "-qm", "llama")
        return args, "modeling_llama.py: exists already"
    if kind == "no-git":
        shutil.rmtree(checkout / ".git")
        return args, "not a git checkout"
    raise AssertionError(kind)


BAD = [
    "not-onboarded", "failed-onboarding", "missing-model-file", "not-a-checkout", "no-registry", "dirty",
    "untracked", "existing-branch", "bad-branch-name", "model-exists", "no-git",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(kind: str, onboarded: Path, checkout: Path) -> None:
    args, expected = _break(kind, onboarded, checkout)
    before = _snapshot(onboarded, checkout)
    code, output = run_pr(*args)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert re.search(expected, lines[0]), lines[0]
    assert _snapshot(onboarded, checkout) == before  # nothing written, git refs and index included


def _drop_registered_as(onboarded: Path) -> None:
    report = json.loads((onboarded / "report.json").read_text())
    del report["registered_as"]
    (onboarded / "report.json").write_text(json.dumps(report))


def test_an_old_report_takes_the_name_from_the_registry_copy(onboarded: Path, checkout: Path) -> None:
    _drop_registered_as(onboarded)
    (onboarded / "registry").mkdir()
    (onboarded / "registry" / "models.yaml").write_text(
        f"models:\n  - name: {HUB_ID}\n    yaml_extra: [a.yaml]\n"
    )
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 0, output
    assert f"- name: {HUB_ID}" in (checkout / MODELS).read_text()


def test_without_a_registry_name_no_entry_is_added(onboarded: Path, checkout: Path) -> None:
    _drop_registered_as(onboarded)
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 0, output
    assert "not registered: the onboarding names no hub checkpoint" in output
    assert "cookbook: no cookbook: it serves the model's registry config, and this PR adds none" in output
    assert (checkout / MODELS).read_text() == MODELS_YAML
    assert "build_and_run_ad.py" not in (onboarded / "PR.md").read_text()


def _visible(checkout: Path) -> dict[str, bytes]:
    """Work tree, index and refs (.git's object store may gain unreachable objects)."""
    return {k: v for k, v in _snapshot(checkout).items() if "/.git/objects/" not in k}


def test_a_git_failure_while_committing_leaves_the_checkout_as_it_was(
    onboarded: Path, checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onboardlm.pr.git as pr_git

    real_git = pr_git.git

    def failing(root: Path, *args: str, **kwargs: object) -> str:
        if args[0] == "update-ref":
            raise pr_git.PrError("git update-ref", "cannot lock ref (simulated)")
        return real_git(root, *args, **kwargs)

    monkeypatch.setattr(pr_git, "git", failing)
    before = _visible(checkout)
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 2 and "error: git update-ref: cannot lock ref (simulated)" in output
    assert _visible(checkout) == before
    assert not (onboarded / "PR.md").exists()


def test_no_git_identity_is_refused_before_anything_is_written(
    onboarded: Path, checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "user.useConfigOnly")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "true")
    before = _visible(checkout)
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 2 and output.startswith("error: git var:"), output
    assert _visible(checkout) == before
