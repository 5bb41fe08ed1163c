"""Import redirection that lets TensorRT-LLM AutoDeploy model files run on onboardlm.

AutoDeploy (AD) model files live in ``tensorrt_llm._torch.auto_deploy.models.custom`` and import
from it absolutely (``from tensorrt_llm._torch.auto_deploy.models.hf import ...``) or relatively
(``from ..hf import ...``, ``from ... import custom_ops``). :func:`autodeploy_imports` puts stand-in
modules under those names into ``sys.modules`` for the duration of a ``with`` block:

========================================================  ======================================
AD module                                                 resolves to
========================================================  ======================================
``tensorrt_llm._torch.auto_deploy.custom_ops``            ``onboardlm.ops``
``tensorrt_llm._torch.auto_deploy.models.hf``             ``onboardlm.models.factory``
``tensorrt_llm._torch.auto_deploy.models.factory``        ``onboardlm.models.factory``
``tensorrt_llm._torch.utils`` (``ActivationType``)        ``onboardlm.ops`` enum
``tensorrt_llm._utils`` (``get_hf_rope_theta``)           a small helper defined here
``tensorrt_llm._torch.auto_deploy.models.custom``         a package whose ``__path__`` is the
                                                          directories passed in
========================================================  ======================================

On exit every ``sys.modules`` entry under ``tensorrt_llm`` is put back as it was (model files loaded
inside the block are dropped) and the factory's registration mapping is restored, so a model file
registered inside the block does not leak into other tests.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import onboardlm.models.custom  # noqa: F401  (registers the shipped lean models before the snapshot)
import onboardlm.models.factory as factory
import onboardlm.ops as ops

ROOT = "tensorrt_llm"
AUTO_DEPLOY = f"{ROOT}._torch.auto_deploy"
CUSTOM = f"{AUTO_DEPLOY}.models.custom"


def get_hf_rope_theta(config: Any, default: float = 10000.0) -> float:
    """RoPE base of a transformers config (``rope_theta``, else ``rope_parameters``), else ``default``."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        theta = getattr(cfg, "rope_theta", None)
        if theta is not None:
            return float(theta)
        params = getattr(cfg, "rope_parameters", None)
        if isinstance(params, dict):
            if params.get("rope_theta") is not None:
                return float(params["rope_theta"])
            for nested in params.values():  # per-layer-type parameters
                if isinstance(nested, dict) and nested.get("rope_theta") is not None:
                    return float(nested["rope_theta"])
    return default


def _package(name: str, path: Sequence[str] = ()) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = list(path)
    return module


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _stand_ins(model_dirs: Sequence[str]) -> dict[str, types.ModuleType]:
    modules = {
        ROOT: _package(ROOT),
        f"{ROOT}._utils": _module(f"{ROOT}._utils", get_hf_rope_theta=get_hf_rope_theta),
        f"{ROOT}._torch": _package(f"{ROOT}._torch"),
        f"{ROOT}._torch.utils": _module(f"{ROOT}._torch.utils", ActivationType=ops.ActivationType),
        AUTO_DEPLOY: _package(AUTO_DEPLOY),
        f"{AUTO_DEPLOY}.custom_ops": ops,
        f"{AUTO_DEPLOY}.models": _package(f"{AUTO_DEPLOY}.models"),
        f"{AUTO_DEPLOY}.models.hf": factory,
        f"{AUTO_DEPLOY}.models.factory": factory,
        CUSTOM: _package(CUSTOM, model_dirs),
    }
    # ``from ... import custom_ops`` looks the child up as an attribute of its parent package.
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent in modules:
            setattr(modules[parent], child, module)
    return modules


def _is_shimmed(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


@contextmanager
def autodeploy_imports(*model_dirs: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, AD import paths resolve to onboardlm; ``model_dirs`` hold AD model files.

    A model file ``<dir>/modeling_x.py`` is then imported as ``load_model_file("modeling_x")``.
    """
    saved_modules = {name: mod for name, mod in sys.modules.items() if _is_shimmed(name)}
    saved_mapping = dict(factory.AutoModelForCausalLMFactory._custom_model_mapping)
    for name in saved_modules:
        del sys.modules[name]
    sys.modules.update(_stand_ins([os.fspath(d) for d in model_dirs]))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for name in [n for n in sys.modules if _is_shimmed(n)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        mapping = factory.AutoModelForCausalLMFactory._custom_model_mapping
        mapping.clear()
        mapping.update(saved_mapping)


def load_model_file(stem: str) -> types.ModuleType:
    """Import ``<model_dir>/<stem>.py`` as ``tensorrt_llm._torch.auto_deploy.models.custom.<stem>``.

    Must be called inside :func:`autodeploy_imports`; importing runs the file's registration call.
    """
    if CUSTOM not in sys.modules:
        raise RuntimeError("load_model_file() must be called inside autodeploy_imports()")
    return importlib.import_module(f"{CUSTOM}.{stem}")
