"""The catalogue of bad inputs: one command line per case, the exact one-line message it prints, its
exit code, and proof that nothing was written or lost.

Each case runs in a fresh work folder ``{ws}`` that is snapshotted (every folder and every file's
bytes) before and after: a case passes only when the snapshot is unchanged, so no output folder,
staging folder, lock file or registry edit survives it. Most cases run in-process (typer's
CliRunner); the interrupted and concurrent onboardings run ``onboardlm onboard`` in a subprocess.
``docs/bad-inputs.md`` is this table for people, and ``test_the_doc_lists_every_case`` keeps the two
equal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import onboardlm.models.custom
from onboardlm.cli import app
from onboardlm.models.source import default_model_path
from onboardlm.onboard.staging import claim_output
from onboardlm.registry import shipped_registry_dir
from onboardlm.testing import trtllm_skeleton
from onboardlm.testing.checkpoints import save_tiny_llama, word_tokenizer

DOC = Path(__file__).parents[1] / "docs" / "bad-inputs.md"
TABLE_START, TABLE_END = "<!-- cases: start -->", "<!-- cases: end -->"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LEAN_LLAMA = Path(onboardlm.models.custom.__file__).parent / "modeling_llama.py"
LLAMA_TEST = Path(__file__).parent / "models" / "generated" / "test_llama_modeling.py"

#: Prepares a case's files in the work folder; gets the work folder and the tiny model to copy.
Setup = Callable[[Path, Path], None]


@dataclass(frozen=True)
class Case:
    """One bad input. ``command`` follows ``onboardlm`` and ``message`` is what follows ``error:``
    (or the text of typer's usage-error box); in both, ``{ws}`` is the work folder, ``{tiny}`` the
    tiny model and ``{lean}`` the lean Llama file; in ``message``, ``{n}`` is a number and ``{*}``
    any text."""

    id: str
    bad: str  # what is wrong, for the table
    command: str
    message: str
    exit_code: int = 2
    setup: Setup | None = None
    unchanged: str = "work folder"  # what the snapshot proves untouched, for the table
    gpus: int | None = None  # simulate this many CUDA devices
    subprocess: bool = False  # run by a dedicated test (signals, a concurrent onboarding)


# --------------------------------------------------------------------------- case setups
def _model(edit: Callable[[Path], None] | None = None) -> Setup:
    """A copy of the tiny model as ``{ws}/model``, then ``edit(model_dir)``."""

    def setup(ws: Path, tiny: Path) -> None:
        shutil.copytree(tiny, ws / "model")
        if edit is not None:
            edit(ws / "model")

    return setup


def _truncated_header(model: Path) -> None:
    file = model / "model.safetensors"
    file.write_bytes(file.read_bytes()[:20])


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def rewrite(model: Path) -> None:
        tensors = load_file(model / "model.safetensors")
        edit(tensors)
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})

    return rewrite


def _config(**fields: object) -> Callable[[Path], None]:
    def rewrite(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **fields}))

    return rewrite


class _RunsCode:
    """Pickles into a call of ``exec`` that creates ``marker``: if loading ran code, the file would exist."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _bin_checkpoint(content: Callable[[Path], object]) -> Callable[[Path], None]:
    """Replace the safetensors file with ``pytorch_model.bin`` holding ``content(model_dir)``."""

    def rewrite(model: Path) -> None:
        (model / "model.safetensors").unlink()
        torch.save(content(model), model / "pytorch_model.bin")

    return rewrite


def _pickle_with_code(model: Path) -> dict[str, object]:
    return {"model.embed_tokens.weight": torch.zeros(2), "payload": _RunsCode(model.parent / "marker")}


def _file(name: str, content: str | bytes | Callable[[], bytes]) -> Setup:
    def setup(ws: Path, tiny: Path) -> None:
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content() if callable(content) else content
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def _gguf(name: str, architecture: str, cut: int = 0) -> Setup:
    """``{ws}/<name>``: a GGUF file of ``architecture`` with one 64x64 tensor, less its last ``cut`` bytes."""

    def setup(ws: Path, tiny: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(str(ws / name), architecture)
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = (ws / name).read_bytes()
        (ws / name).write_bytes(data[: len(data) - cut])

    return setup


def _registry(edit: Callable[[Path], None] | None = None) -> Setup:
    """A copy of the shipped registry as ``{ws}/registry``, then ``edit(registry_dir)``."""

    def setup(ws: Path, tiny: Path) -> None:
        shutil.copytree(shipped_registry_dir(), ws / "registry", ignore=shutil.ignore_patterns("*.py", "__*"))
        if edit is not None:
            edit(ws / "registry")

    return setup


def _break_models_yaml(registry: Path) -> None:
    models = registry / "models.yaml"
    models.write_text(models.read_text().replace("models:", "models: [", 1))


def _previous_output(ws: Path, tiny: Path) -> None:
    """An earlier onboarding's output folder, which a failed or interrupted one must leave as it is."""
    (ws / "out").mkdir()
    (ws / "out" / "report.md").write_text("# Onboarding report: the previous run\n")


def _pr(edit: Callable[[Path], None] | None = None, status: str = "pass") -> Setup:
    """An onboarding output ``{ws}/onboarded`` (the shipped Llama) and a skeleton TensorRT-LLM checkout
    ``{ws}/trt``, then ``edit(ws)``."""

    def setup(ws: Path, tiny: Path) -> None:
        trtllm_skeleton.write_onboarding(ws / "onboarded", LLAMA_TEST.read_text(), status)
        (ws / "trt").mkdir()
        trtllm_skeleton.make_checkout(ws / "trt")
        if edit is not None:
            edit(ws)

    return setup


def _dirty(ws: Path) -> None:
    init = ws / "trt" / "tensorrt_llm/_torch/auto_deploy/models/custom/__init__.py"
    init.write_text(init.read_text() + "# a local edit\n")


def _both(*setups: Setup) -> Setup:
    def setup(ws: Path, tiny: Path) -> None:
        for each in setups:
            each(ws, tiny)

    return setup


# --------------------------------------------------------------------------- the catalogue
OUT = "output folder absent, no staging folder or lock file"
REGISTRY = "registry files byte-identical"
PR = "checkout (files, index, branches) and onboarding folder byte-identical, no PR.md"
RUN_TINY = "run --model {ws}/model -p hi --max-new-tokens 2"
MISSING_CONFIG = _registry(lambda registry: (registry / "configs" / "smollm2-135m-instruct.yaml").unlink())

CASES: tuple[Case, ...] = (
    # ------------------------------------------------------------------ onboard: the model
    Case("onboard-unknown-hub-id", "hub id that is not in the local cache",
         "onboard no-such-org/no-such-model --out {ws}/out",
         "no-such-org/no-such-model: not in the local HuggingFace cache and not a known model_type "
         "(download it first, or pass a local directory, a .gguf file or a model_type)", unchanged=OUT),
    Case("onboard-missing-path", "path that does not exist", "onboard ./does/not/exist --out {ws}/out",
         "./does/not/exist: no such file or directory (check the path)", unchanged=OUT),
    Case("onboard-encoder-only", "encoder-only model type", "onboard bert --out {ws}/out",
         "bert: bert is an encoder-only model (onboardlm handles decoder-only causal LMs)", unchanged=OUT),
    Case("onboard-seq2seq", "encoder-decoder model type", "onboard t5 --out {ws}/out",
         "t5: t5 is an encoder-decoder (seq2seq) model (onboardlm handles decoder-only LMs)", unchanged=OUT),
    Case("onboard-no-config-json", "directory without `config.json`", "onboard {ws}/model --out {ws}/out",
         "{ws}/model: directory has no config.json (point to a model directory or a .gguf file)",
         setup=_file("model/tokenizer.json", "{}"), unchanged=OUT),
    Case("onboard-malformed-config-json", "`config.json` that is not JSON", "onboard {ws}/model --out {ws}/out",
         "{ws}/model/config.json: malformed JSON: Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)", setup=_file("model/config.json", "{broken"), unchanged=OUT),
    Case("onboard-config-wrong-type", "`config.json` with a wrong-typed field (`num_hidden_layers: \"two\"`)",
         "onboard {ws}/model --out {ws}/out",
         "{ws}/model/config.json: cannot load the config: Field 'num_hidden_layers' expected int, got str "
         "(value: 'two') (fix config.json)", setup=_model(_config(num_hidden_layers="two")), unchanged=OUT),
    Case("onboard-remote-code", "model whose config needs remote code, without `--allow-remote-code`",
         "onboard {ws}/model --out {ws}/out",
         "{ws}/model: this model needs remote code that transformers does not ship "
         "(review the code, then pass --allow-remote-code)",
         setup=_file("model/config.json", '{"model_type": "my_own_llm", "auto_map": {"AutoConfig": "x.C"}}'),
         unchanged=OUT),
    Case("onboard-truncated-safetensors", "safetensors file cut inside its header",
         "onboard {ws}/model --out {ws}/out",
         "{ws}/model/model.safetensors: corrupt or unreadable safetensors file: "
         "Error while deserializing header: invalid header length", setup=_model(_truncated_header),
         unchanged=OUT),
    Case("onboard-pickle-with-code", "`pytorch_model.bin` whose pickle calls `exec` (creates a marker file)",
         "onboard {ws}/model --out {ws}/out",
         "{ws}/model/pytorch_model.bin: refused: the pickle calls exec, not a plain state dict; nothing was run "
         "(convert it to safetensors)",
         setup=_model(_bin_checkpoint(_pickle_with_code)), unchanged=f"marker file never created; {OUT}"),
    Case("onboard-truncated-gguf", "GGUF file cut after 100 bytes", "onboard {ws}/cut.gguf --out {ws}/out",
         "{ws}/cut.gguf: cannot read this GGUF file: truncated or corrupt ({*}) (download it again)",
         setup=_file("cut.gguf", lambda: default_model_path().read_bytes()[:100]), unchanged=OUT),
    Case("onboard-corrupt-gguf", "`.gguf` file that is not GGUF", "onboard {ws}/junk.gguf --out {ws}/out",
         "{ws}/junk.gguf: cannot read this GGUF file: truncated or corrupt (ValueError: {ws}/junk.gguf does "
         "not start with the GGUF magic bytes, so it is not a GGUF file.) (download it again)",
         setup=_file("junk.gguf", b"not a gguf file" * 8), unchanged=OUT),
    Case("onboard-gguf-unsupported-arch", "GGUF of an architecture transformers cannot read (`grok`)",
         "onboard {ws}/grok.gguf --out {ws}/out",
         "{ws}/grok.gguf: cannot read this GGUF file: architecture 'grok' is not supported by transformers' "
         "GGUF reader (use a safetensors checkpoint of the model)", setup=_gguf("grok.gguf", "grok"),
         unchanged=OUT),
    # ------------------------------------------------------------------ onboard: the output folder
    Case("onboard-existing-output", "output folder exists, no `--force`", "onboard llama --out {ws}/out",
         "{ws}/out: output folder already exists (pass --force to replace it)", setup=_previous_output,
         unchanged="previous output folder byte-identical"),
    Case("onboard-output-is-a-file", "`--out` names a file", "onboard llama --out {ws}/out --force",
         "{ws}/out: exists and is not a folder (choose another --out)", setup=_file("out", "mine"),
         unchanged="the file byte-identical"),
    Case("onboard-file-in-the-path", "a file where `--out` needs a folder", "onboard llama --out {ws}/a-file/out",
         "{ws}/a-file/out: {ws}/a-file is a file, not a folder (choose another --out)",
         setup=_file("a-file", "mine"), unchanged="the file byte-identical"),
    Case("onboard-read-only-output", "`--out` in a folder no one may write, root included (`/proc`)",
         "onboard llama --out /proc/onboardlm-out",
         "/proc/onboardlm-out: cannot write the output folder ({*}) (choose a writable --out)",
         unchanged="work folder; nothing created in `/proc`"),
    Case("onboard-interrupted", "Ctrl-C (SIGINT to the process group) during the verify phase",
         "onboard llama --out {ws}/out --force",
         "{ws}/out: interrupted; the output folder is left as it was", exit_code=130, setup=_previous_output,
         unchanged="previous output folder byte-identical, no staging folder or lock file", subprocess=True),
    Case("onboard-killed", "SIGKILL during the verify phase, then the same command again",
         "onboard llama --out {ws}/out --force", "", exit_code=-9, setup=_previous_output,
         unchanged="previous output folder intact after the kill; the next run passes and leaves no "
         "staging folder or lock file", subprocess=True),
    Case("onboard-concurrent", "a second onboarding into an output folder that one is writing",
         "onboard llama --out {ws}/out",
         "{ws}/out: another onboardlm onboard (pid {n}) is writing this output folder "
         "(wait for it to finish or choose another --out)",
         unchanged="the running onboarding's staging folder; that onboarding then passes", subprocess=True),
    # ------------------------------------------------------------------ run: the model and its weights
    Case("run-unknown-registry-name", "`--use-registry` with a name not in the registry",
         "run --model nobody/NoSuchModel --use-registry --registry-dir {ws}/registry",
         "nobody/NoSuchModel: not in the registry {ws}/registry/models.yaml (see `onboardlm registry list`)",
         setup=_registry(), unchanged=REGISTRY),
    Case("run-missing-path", "model path that does not exist", "run --model /no/such/dir",
         "/no/such/dir: no such file or directory (check the path)"),
    Case("run-not-a-model", "name that is no path, model type or cached hub id", "run --model not-a-model-type-or-id",
         "not-a-model-type-or-id: not in the local HuggingFace cache and not a known model_type "
         "(download it first, or pass a local directory, a .gguf file or a model_type)"),
    Case("run-no-tokenizer", "model directory without tokenizer files", "run --model {ws}/model",
         "{ws}/model: has no tokenizer files (use a model directory or GGUF with a tokenizer)",
         setup=_file("model/config.json", '{"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2, '
                     '"num_hidden_layers": 1, "vocab_size": 100}')),
    Case("run-config-wrong-type", "`config.json` with a wrong-typed field (`hidden_size: [32]`)", RUN_TINY,
         "{ws}/model/config.json: cannot load the config: Field 'hidden_size' expected int, got list "
         "(value: [32]) (fix config.json)", setup=_model(_config(hidden_size=[32]))),
    Case("run-truncated-safetensors", "safetensors file cut inside its header", RUN_TINY,
         "{ws}/model/model.safetensors: corrupt or unreadable safetensors file: "
         "Error while deserializing header: invalid header length", setup=_model(_truncated_header)),
    Case("run-missing-tensor", "safetensors file without `model.norm.weight`", RUN_TINY,
         "{ws}/model/model.safetensors: checkpoint keys do not match the model: missing keys ['model.norm.weight']",
         setup=_model(_tensors(lambda tensors: tensors.pop("model.norm.weight")))),
    Case("run-wrong-shape", "tensor of the wrong shape (`model.norm.weight` [5] for [32])", RUN_TINY,
         "{ws}/model/model.safetensors: checkpoint does not fit the model: size mismatch for model.norm.weight: "
         "[5] in the checkpoint, [32] in the model",
         setup=_model(_tensors(lambda tensors: tensors.update({"model.norm.weight": torch.ones(5)})))),
    Case("run-pickle-with-code", "`pytorch_model.bin` whose pickle calls `exec` (creates a marker file)", RUN_TINY,
         "{ws}/model/pytorch_model.bin: refused: the pickle calls exec, not a plain state dict; nothing was run "
         "(convert it to safetensors)",
         setup=_model(_bin_checkpoint(_pickle_with_code)), unchanged="marker file never created"),
    Case("run-bin-not-a-state-dict", "`pytorch_model.bin` holding a list of tensors", RUN_TINY,
         "{ws}/model/pytorch_model.bin: not a state dict of tensors: it holds a list (save model.state_dict())",
         setup=_model(_bin_checkpoint(lambda model: [torch.zeros(2)]))),
    Case("run-truncated-gguf", "Llama GGUF file missing the last 1000 bytes of its tensor data",
         "run --model {ws}/cut.gguf",
         "{ws}/cut.gguf: cannot read this GGUF file: truncated or corrupt (ValueError: cannot reshape array "
         "of size 3846 into shape (64,64)) (download it again)", setup=_gguf("cut.gguf", "llama", cut=1000)),
    # ------------------------------------------------------------------ run: options
    Case("run-empty-prompt", "empty prompt", "run --model {tiny} -p ''",
         "prompt 0: empty or blank (give it some text, or leave out --prompt for the default prompts)"),
    Case("run-prompt-too-long", "prompt longer than `max_seq_len` allows",
         "run --model {tiny} --max-seq-len 12 --max-new-tokens 8 -p 'one two three four five six'",
         "prompt 0 ({n} tokens): longer than the cache allows: {n} + max_new_tokens 8 > max_seq_len 12 "
         "(shorten the prompt, lower max_new_tokens or raise max_seq_len)"),
    Case("run-max-new-tokens-zero", "`--max-new-tokens 0`", "run --max-new-tokens 0",
         "Invalid value for '--max-new-tokens': Input should be greater than or equal to 1"),
    Case("run-max-new-tokens-negative", "`--max-new-tokens -3`", "run --max-new-tokens -3",
         "Invalid value for '--max-new-tokens': Input should be greater than or equal to 1"),
    Case("run-max-new-tokens-over-seq-len", "`--max-new-tokens` not below `--max-seq-len`",
         "run --max-new-tokens 64 --max-seq-len 32",
         "command-line options: max_new_tokens (64) must be smaller than max_seq_len (32)"),
    Case("run-unknown-dtype", "unknown `--dtype`", "run --dtype float13",
         "Invalid value for '--dtype': Value error, 'float13' is not one of 'float32', 'bfloat16', 'float16'."),
    Case("run-unknown-device", "unknown `--device`", "run --device tpu",
         "command-line options: device: input should be 'cpu', 'cuda' or 'auto', got 'tpu'"),
    Case("run-cuda-without-gpu", "`--device cuda` on a machine without a GPU (one simulated: none)",
         "run --model {tiny} --device cuda", "device 'cuda': no CUDA GPU is available here (use --device cpu)",
         gpus=0),
    Case("run-world-size-over-gpus", "`--world-size 2 --device cuda` with one GPU (simulated)",
         "run --model {tiny} --device cuda --world-size 2",
         "world size: 2 ranks but only 1 cuda device(s) (lower it)", gpus=1),
    Case("run-world-size-without-torchrun", "`--world-size 2` on the CPU, not started by torchrun",
         "run --model {tiny} --device cpu --world-size 2",
         "--world-size 2: this process was started as rank 0 of 1 "
         "(launch it as: torchrun --nproc-per-node 2 -m onboardlm.cli run ... --world-size 2)"),
    # ------------------------------------------------------------------ run: settings files
    Case("run-yaml-extra-missing", "`--args.yaml-extra` file that does not exist", "run --args.yaml-extra {ws}/extra.yaml",
         "{ws}/extra.yaml: file not found"),
    Case("run-yaml-extra-malformed", "`--args.yaml-extra` file that is not YAML", "run --args.yaml-extra {ws}/extra.yaml",
         "{ws}/extra.yaml: malformed YAML at line 2, column 1: expected the node content, but found "
         "'<stream end>' (while parsing a flow node at line 2)", setup=_file("extra.yaml", "max_batch_size: [1,\n")),
    Case("run-yaml-extra-unknown-key", "unknown key in an `--args.yaml-extra` file",
         "run --args.yaml-extra {ws}/extra.yaml",
         "{ws}/extra.yaml: key 'max_batch': unknown key, did you mean 'max_batch_size'?",
         setup=_file("extra.yaml", "max_batch: 4\n")),
    Case("run-yaml-extra-quoted-number", "quoted number in an `--args.yaml-extra` file",
         "run --args.yaml-extra {ws}/extra.yaml",
         "{ws}/extra.yaml: key 'max_seq_len': input should be a valid integer, got '128'",
         setup=_file("extra.yaml", "max_seq_len: '128'\n")),
    Case("run-yaml-extra-unknown-dtype", "unknown dtype in an `--args.yaml-extra` file",
         "run --args.yaml-extra {ws}/extra.yaml",
         "{ws}/extra.yaml: key 'dtype': input should be 'float32', 'bfloat16', 'float16' or 'auto', got 'float13'",
         setup=_file("extra.yaml", "dtype: float13\n")),
    Case("run-yaml-extra-max-new-tokens-zero", "`max_new_tokens: 0` in an `--args.yaml-extra` file",
         "run --args.yaml-extra {ws}/extra.yaml",
         "{ws}/extra.yaml: key 'max_new_tokens': must be a positive integer, got 0",
         setup=_file("extra.yaml", "max_new_tokens: 0\n")),
    Case("run-registry-malformed", "`--use-registry` with a malformed `models.yaml`",
         f"run --model {SMOL} --use-registry --registry-dir {{ws}}/registry",
         "{ws}/registry/models.yaml: malformed YAML at line {n}, column {n}: expected the node content, "
         "but found '-' (while parsing a flow node at line {n})", setup=_registry(_break_models_yaml),
         unchanged=REGISTRY),
    Case("run-registry-missing-config", "`--use-registry` whose entry names a missing config file",
         f"run --model {SMOL} --use-registry --registry-dir {{ws}}/registry",
         "{ws}/registry/configs/smollm2-135m-instruct.yaml: file not found", setup=MISSING_CONFIG,
         unchanged=REGISTRY),
    # ------------------------------------------------------------------ review
    Case("review-missing-file", "model file that does not exist", "review {ws}/modeling_x.py",
         "{ws}/modeling_x.py: model file does not exist"),
    Case("review-not-python", "model file that is not `.py`", "review {ws}/model.txt",
         "{ws}/model.txt: model file is not a Python file (.py)", setup=_file("model.txt", "x = 1\n")),
    Case("review-syntax-error", "model file that does not parse", "review {ws}/modeling_x.py",
         "{ws}/modeling_x.py: model file does not parse: line 1: invalid syntax",
         setup=_file("modeling_x.py", "def f(:\n")),
    Case("review-no-causal-lm", "model file without a `*ForCausalLM` class", "review {ws}/modeling_x.py",
         "{ws}/modeling_x.py: model file has no *ForCausalLM{*} class", setup=_file("modeling_x.py", "x = 1\n")),
    Case("review-missing-test-file", "`--test-file` that does not exist",
         "review {lean} --test-file {ws}/test_x.py", "{ws}/test_x.py: test file does not exist"),
    Case("review-keys-not-json", "`--checkpoint-keys` file that is not JSON",
         "review {lean} --checkpoint-keys {ws}/keys.json",
         "{ws}/keys.json: checkpoint keys file is not JSON: Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)", setup=_file("keys.json", "{broken")),
    Case("review-keys-wrong-shape", "`--checkpoint-keys` JSON that is neither a list nor an index",
         "review {lean} --checkpoint-keys {ws}/keys.json",
         "{ws}/keys.json: expected a JSON list of keys or a safetensors index with 'weight_map'",
         setup=_file("keys.json", '{"a": 1}')),
    Case("review-unknown-reference", "`--reference` that is no transformers model type",
         "review {lean} --reference nosuchtype",
         "nosuchtype: --reference is not a model_type known to transformers"),
    # ------------------------------------------------------------------ registry
    Case("registry-malformed-yaml", "malformed `models.yaml`", "registry list --registry-dir {ws}/registry",
         "{ws}/registry/models.yaml: malformed YAML at line {n}, column {n}: expected the node content, "
         "but found '-' (while parsing a flow node at line {n})", setup=_registry(_break_models_yaml),
         unchanged=REGISTRY),
    Case("registry-add-to-malformed", "`add` to a registry whose `models.yaml` is malformed",
         "registry add new/model --world-size 1 --registry-dir {ws}/registry",
         "{ws}/registry/models.yaml: malformed YAML at line {n}, column {n}: expected the node content, "
         "but found '-' (while parsing a flow node at line {n})", setup=_registry(_break_models_yaml),
         unchanged=REGISTRY),
    Case("registry-missing-config", "entry whose `yaml_extra` names a missing config file",
         f"registry show {SMOL} --registry-dir {{ws}}/registry",
         "{ws}/registry/configs/smollm2-135m-instruct.yaml: file not found", setup=MISSING_CONFIG,
         unchanged=REGISTRY),
    Case("registry-missing-dir", "`--registry-dir` that does not exist", "registry list --registry-dir {ws}/nowhere",
         "{ws}/nowhere: registry directory not found"),
    Case("registry-show-unknown", "`show` of a name not in the registry",
         "registry show HuggingFaceTB/SmolLM2-135M --registry-dir {ws}/registry",
         f"HuggingFaceTB/SmolLM2-135M: not in the registry {{ws}}/registry/models.yaml (did you mean {SMOL}, "
         "HuggingFaceTB/SmolLM2-360M-Instruct, HuggingFaceTB/SmolLM2-1.7B-Instruct?)",
         setup=_registry(), unchanged=REGISTRY),
    Case("registry-add-duplicate", "`add` of a name already registered",
         f"registry add {SMOL} --world-size 1 --registry-dir {{ws}}/registry",
         f"{SMOL}: already in the registry (edit its entry instead of adding it again)", setup=_registry(), unchanged=REGISTRY),
    Case("registry-add-no-size", "`add` without `--world-size` or `--params`",
         "registry add new/model --registry-dir {ws}/registry",
         "--world-size: give --world-size N or --params COUNT (e.g. --params 8B)", setup=_registry(),
         unchanged=REGISTRY),
    Case("registry-add-bad-params", "`--params` that is not a count", "registry add new/model --params eight "
         "--registry-dir {ws}/registry", "eight: not a parameter count (write e.g. 135M, 1.7B or 8e9)",
         setup=_registry(), unchanged=REGISTRY),
    Case("registry-add-world-size-zero", "`--world-size 0`", "registry add new/model --world-size 0 "
         "--registry-dir {ws}/registry", "Invalid value for '--world-size': Input should be greater than or equal to 1",
         setup=_registry(), unchanged=REGISTRY),
    Case("registry-add-world-size-without-config", "`--world-size 3` (no `world_size_3.yaml`)",
         "registry add new/model --world-size 3 --registry-dir {ws}/registry",
         "{ws}/registry/configs/world_size_3.yaml: config file not found (world sizes available: [1, 2, 4, 8])",
         setup=_registry(), unchanged=REGISTRY),
    Case("registry-add-missing-extra", "`--extra` naming a config that does not exist",
         "registry add new/model --world-size 1 --extra nope.yaml --registry-dir {ws}/registry",
         "nope.yaml: config file not found (looked under {ws}/registry/configs and as a path)", setup=_registry(), unchanged=REGISTRY),
    Case("registry-add-extra-unknown-key", "`--extra` file with an unknown key",
         "registry add new/model --world-size 1 --extra {ws}/extra.yaml --registry-dir {ws}/registry",
         "{ws}/extra.yaml: key 'max_batch': unknown key, did you mean 'max_batch_size'?",
         setup=_both(_registry(), _file("extra.yaml", "max_batch: 4\n")), unchanged=REGISTRY),
    # ------------------------------------------------------------------ pr
    Case("pr-not-onboarded", "folder that is not an onboarding output", "pr {ws}/trt --into {ws}/trt",
         "{ws}/trt: not an onboarding output: no report.json in it", setup=_pr(), unchanged=PR),
    Case("pr-failed-onboarding", "onboarding output of a failed onboarding", "pr {ws}/onboarded --into {ws}/trt",
         "{ws}/onboarded: the onboarding did not pass (failed: verify) (fix it first)", setup=_pr(status="fail"),
         unchanged=PR),
    Case("pr-not-a-checkout", "`--into` a folder without TensorRT-LLM's layout",
         "pr {ws}/onboarded --into {ws}/onboarded",
         "{ws}/onboarded: not a TensorRT-LLM checkout: tensorrt_llm/_torch/auto_deploy/models/custom/__init__.py "
         "is missing", setup=_pr(), unchanged=PR),
    Case("pr-dirty-checkout", "checkout with uncommitted changes", "pr {ws}/onboarded --into {ws}/trt",
         "{ws}/trt: the checkout is dirty (1 change(s), first: M tensorrt_llm/_torch/auto_deploy/models/custom/"
         "__init__.py) (commit or stash them)", setup=_pr(_dirty), unchanged=PR),
    Case("pr-existing-branch", "`--branch` that exists already", "pr {ws}/onboarded --into {ws}/trt --branch main",
         "main: branch exists already in {ws}/trt (choose another with --branch)", setup=_pr(), unchanged=PR),
    # ------------------------------------------------------------------ out-of-tree models
    Case("run-custom-dir-missing", "`--custom-model-dir` that does not exist",
         "run --model {ws}/model -p hi --custom-model-dir {ws}/nowhere",
         "{ws}/nowhere: custom model folder not found (pass a folder of model files)", setup=_model()),
    Case("run-custom-dir-empty", "`--custom-model-dir` with no `.py` file",
         "run --model {ws}/model -p hi --custom-model-dir {ws}/models",
         "{ws}/models: no model files (*.py) in the custom model folder (put modeling_<type>.py in it)",
         setup=_both(_model(), _file("models/README.md", "notes\n"))),
    Case("review-custom-dir-registers-nothing", "`--custom-model-dir` whose files register no model",
         "review llama --custom-model-dir {ws}/models",
         "{ws}/models: its files registered no model (end each file with "
         "AutoModelForCausalLMFactory.register_custom_model_cls(...))", setup=_file("models/modeling_x.py", "x = 1\n")),
    Case("debug-custom-dir-import-fails", "`--custom-model-dir` file that raises on import",
         "debug accuracy {ws}/model --custom-model-dir {ws}/models",
         "{ws}/models/modeling_x.py: importing the model file failed: RuntimeError: boom (fix the file)",
         setup=_both(_model(), _file("models/modeling_x.py", "raise RuntimeError('boom')\n"))),
    # ------------------------------------------------------------------ debug
    Case("debug-unknown-model", "name that is no path, model type or cached hub id",
         "debug accuracy not-a-model-type-or-id",
         "not-a-model-type-or-id: not in the local HuggingFace cache and not a known model_type "
         "(download it first, or pass a local directory, a .gguf file or a model_type)"),
    Case("debug-no-lean-model", "model type with no lean model registered", "debug accuracy dbrx",
         "dbrx: no lean model is registered for DbrxConfig "
         "(onboard it first, or pass --custom-model-dir with its model file)"),
    Case("debug-one-token-prompt", "prompt of one token (nothing to compare position by position)",
         "debug accuracy {ws}/model -p hi", "'hi': gives 1 token(s) (use a prompt of two or more tokens)",
         setup=_model()),
    # ------------------------------------------------------------------ viz
    Case("viz-layer-out-of-range", "`--layer` past the model's last layer", "viz {ws}/model --layer 7 -o {ws}/l.dot",
         "--layer 7: the model has 2 decoder layers (0 .. 1)", setup=_model()),
    Case("viz-not-a-dump", "`.txt` file that is not a graph dump", "viz {ws}/notes.txt --layer 0 -o {ws}/l.dot",
         "{ws}/notes.txt: no graph code in it (no 'def forward(self, ...)') (pass a graph dump .txt file)",
         setup=_file("notes.txt", "hello\n")),
    Case("viz-bad-trace", "`--profile` file with no profiler events",
         "viz {ws}/model --layer 0 --profile {ws}/trace.json -o {ws}/l.dot",
         "{ws}/trace.json: no CPU op events in it (export it with torch.profiler's prof.export_chrome_trace)",
         setup=_both(_model(), _file("trace.json", "{}"))),
    Case("viz-unknown-format", "`-o` with an unknown picture format", "viz {ws}/model --layer 0 -o {ws}/l.jpg",
         "{ws}/l.jpg: unknown output format '.jpg' (use .dot, .svg, .png or .pdf)", setup=_model()),
    Case("viz-output-folder-missing", "`-o` into a folder that does not exist",
         "viz {ws}/model --layer 0 -o {ws}/no/l.dot",
         "{ws}/no/l.dot: its folder does not exist (create it or pick another --output)", setup=_model()),
)  # fmt: skip
CASE_BY_ID = {case.id: case for case in CASES}
IN_PROCESS = [case for case in CASES if not case.subprocess]


# --------------------------------------------------------------------------- checking a case
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a word-level tokenizer (every word but ``hi`` is unknown)."""
    tokenizer = word_tokenizer({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3})
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The work folder, also the current directory (so a default output folder would land in it)."""
    work = tmp_path / "ws"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under ``root``, by relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
        for path in sorted(root.rglob("*"))
    }


def _values(ws: Path, tiny: Path) -> dict[str, str]:
    return {"ws": str(ws), "tiny": str(tiny), "lean": str(LEAN_LLAMA)}


def argv(case: Case, ws: Path, tiny: Path) -> list[str]:
    command = case.command
    for key, value in _values(ws, tiny).items():
        command = command.replace(f"{{{key}}}", value)
    return shlex.split(command)


def message_pattern(case: Case, ws: Path, tiny: Path) -> re.Pattern[str]:
    values = {f"{{{key}}}": re.escape(value) for key, value in _values(ws, tiny).items()}
    values |= {"{n}": r"\d+", "{*}": ".*?"}
    parts = re.split(r"(\{\w+\}|\{\*\})", case.message)
    return re.compile("".join(values.get(part, re.escape(part)) for part in parts))


def error_message(output: str) -> str:
    """The one error message in ``output``: an ``error:`` line, or the text of typer's error box."""
    found = [line.removeprefix("error: ") for line in output.splitlines() if line.startswith("error: ")]
    box = re.search(r"╭─+ Error ─+╮\n(.*?)\n╰", output, re.DOTALL)
    if box:
        found.append(" ".join(line.strip("│ ") for line in box.group(1).splitlines()))
    assert len(found) == 1, f"expected exactly one error message:\n{output}"
    return found[0]


def check_output(case: Case, output: str, exit_code: int, ws: Path, tiny: Path) -> None:
    assert "Traceback" not in output and "internal error" not in output, output
    assert exit_code == case.exit_code, output
    assert message_pattern(case, ws, tiny).fullmatch(error_message(output)), output


def _simulate_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)


@pytest.mark.parametrize("case", IN_PROCESS, ids=[case.id for case in IN_PROCESS])
def test_bad_input_gives_one_message_and_changes_nothing(
    case: Case, ws: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.setup is not None:
        case.setup(ws, tiny)
    if case.gpus is not None:
        _simulate_gpus(monkeypatch, case.gpus)
    before = snapshot(ws)
    result = runner.invoke(app, argv(case, ws, tiny))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    check_output(case, result.output, result.exit_code, ws, tiny)
    assert snapshot(ws) == before
    assert not (ws / "marker").exists()  # the pickle cases: its code never ran
    assert not Path("/proc/onboardlm-out").exists()


# --------------------------------------------------------------------------- signals and concurrency
def _start(case: Case, ws: Path, tiny: Path) -> subprocess.Popen[str]:
    """``onboardlm <command>`` in its own process group (as a shell runs it), in the work folder."""
    command = [sys.executable, "-m", "onboardlm.cli", *argv(case, ws, tiny)]
    return subprocess.Popen(
        command, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_for_verify(process: subprocess.Popen[str], timeout_s: float = 120.0) -> list[int]:
    """Wait until ``process`` runs the generated tests (the verify phase); return their pytest pids."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        pids = []
        for pid in _children(process.pid):
            try:
                if b"pytest" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                continue
        if pids:
            return pids
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no verify phase within {timeout_s} s: {process.communicate()}")


def _staging_folders(ws: Path) -> list[str]:
    return [path.name for path in ws.iterdir() if path.name.startswith(".out.staging-")]


def test_interrupt_during_verify_keeps_the_previous_output(ws: Path, tiny: Path) -> None:
    case = CASE_BY_ID["onboard-interrupted"]
    assert case.setup is not None
    case.setup(ws, tiny)
    before = snapshot(ws)
    process = _start(case, ws, tiny)
    _wait_for_verify(process)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = process.communicate(timeout=60)
    check_output(case, stdout + stderr, process.returncode, ws, tiny)
    assert snapshot(ws) == before


def test_a_killed_onboarding_is_cleaned_up_by_the_next_which_refuses_a_concurrent_one(
    ws: Path, tiny: Path
) -> None:
    """SIGKILL in verify: the previous output stays and a staging folder is left behind. The next
    onboarding removes it, and while it runs a second one into the same folder is refused."""
    killed, concurrent = CASE_BY_ID["onboard-killed"], CASE_BY_ID["onboard-concurrent"]
    assert killed.setup is not None
    killed.setup(ws, tiny)
    previous = snapshot(ws / "out")
    process = _start(killed, ws, tiny)
    orphans = _wait_for_verify(process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    for pid in orphans:  # its pytest would finish on its own; it writes nothing into the staging folder
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == killed.exit_code
    assert snapshot(ws / "out") == previous
    assert _staging_folders(ws)  # what the kill left behind

    next_run = _start(killed, ws, tiny)
    try:
        _wait_for_verify(next_run)
        staging = _staging_folders(ws)
        assert len(staging) == 1  # its own: the killed run's is gone
        for args in (argv(concurrent, ws, tiny), [*argv(concurrent, ws, tiny), "--force"]):
            refused = runner.invoke(app, args)
            check_output(concurrent, refused.output, refused.exit_code, ws, tiny)
        assert _staging_folders(ws) == staging  # the running onboarding's work is untouched
        stdout, stderr = next_run.communicate(timeout=180)
    finally:
        if next_run.poll() is None:
            next_run.kill()
    assert next_run.returncode == 0, stdout + stderr
    assert sorted(path.name for path in ws.iterdir()) == ["out"]  # no staging folder, no lock file
    assert json.loads((ws / "out" / "report.json").read_text())["status"] == "pass"


def test_a_kill_inside_publish_gives_the_previous_folder_back(tmp_path: Path) -> None:
    """Killed between publish's two renames: the previous folder is the backup; the next claim restores it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("# the previous run\n")
    previous = snapshot(out)
    out.rename(tmp_path / ".out.old")  # publish's first rename
    (tmp_path / ".out.staging-abcd1234").mkdir()  # the new folder, not yet in place
    with claim_output(out, force=True) as staging:
        assert snapshot(out) == previous
        assert sorted(path.name for path in tmp_path.iterdir()) == [".out.lock", staging.path.name, "out"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- the table in the docs
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`` {_cell(text)} ``" if "`" in text else f"`{_cell(text)}`"


def render_table() -> str:
    """The table of ``docs/bad-inputs.md``, one row per case."""
    rows = ["| case | bad input | command (`onboardlm ...`) | message (after `error:`) | exit | unchanged |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for case in CASES:
        message = _code(case.message) if case.message else "(none: the process is killed)"
        exit_text = "SIGKILL" if case.exit_code < 0 else str(case.exit_code)
        cells = [case.id, _cell(case.bad), _code(case.command), message, exit_text, _cell(case.unchanged)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def test_the_doc_lists_every_case() -> None:
    text = DOC.read_text()
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n") + "\n"
    assert table == render_table(), (
        "docs/bad-inputs.md is out of date; paste render_table() between the markers"
    )
    assert f"{len(CASES)} cases" in text


def test_case_ids_are_unique_and_cover_every_command() -> None:
    assert len(CASE_BY_ID) == len(CASES) >= 30
    commands = {"onboard", "run", "review", "registry", "pr", "debug", "viz"}
    assert {case.command.split()[0] for case in CASES} == commands
    assert all(case.exit_code != 0 for case in CASES)
