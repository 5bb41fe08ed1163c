"""One-line reasons for the exceptions transformers raises on a config or an input it cannot handle.

transformers raises anything (``TypeError`` on a None field, ``KeyError`` on a missing RoPE table,
``ImportError`` for a vision backbone's packages) when it builds or runs a model from a config it does
not expect. The functions here turn such an exception into an :class:`UnsupportedFeature` that names
the transformers module (the class of ``self`` in the innermost frame of a transformers modeling file,
with file and line) and what went wrong: the config fields the failing line reads that are unset, else
the failing line and the error.
"""

from __future__ import annotations

import linecache
import re
from types import FrameType

from transformers import PretrainedConfig

from onboardlm.errors import UnsupportedFeature

__all__ = ["transformers_failure", "unbuildable"]

_MISSING_PACKAGE = re.compile(r"requires the (\S+) library but it was not found")
_PIP_NAMES = {"PIL": "pillow"}
_CONFIG_READ = re.compile(r"\b(?:self\.)?(?:config|\w+_config)\.(\w+)")
_SELF_READ = re.compile(r"\bself\.(\w+)\b(?!\s*=[^=])")


def _innermost_transformers_frame(err: BaseException) -> FrameType | None:
    """The innermost frame of a transformers modeling file in ``err``'s traceback."""
    tb, found = err.__traceback__, None
    while tb is not None:
        if "/transformers/models/" in tb.tb_frame.f_code.co_filename:
            found = tb.tb_frame
        tb = tb.tb_next
    return found


def _innermost_frame(err: BaseException) -> FrameType | None:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame if tb is not None else None


def _line(frame: FrameType, lineno: int) -> str:
    return linecache.getline(frame.f_code.co_filename, lineno).strip()


def _unset_fields(config: PretrainedConfig, frame: FrameType) -> list[str]:
    """Config fields None in ``config`` (or a sub-config) that the failing line reads, directly or
    through an attribute the same function copied from the config (``self.x = config.y``)."""
    configs = [config, *(getattr(config, name, None) for name in type(config).sub_configs)]

    def unset(name: str) -> bool:
        return any(
            isinstance(c, PretrainedConfig) and hasattr(c, name) and getattr(c, name) is None for c in configs
        )

    line = _line(frame, frame.f_lineno)
    names = [name for name in _CONFIG_READ.findall(line) if unset(name)]
    this = frame.f_locals.get("self")
    copied = [
        name for name in _SELF_READ.findall(line) if this is not None and getattr(this, name, 0) is None
    ]
    for lineno in range(frame.f_code.co_firstlineno, frame.f_lineno):
        source = _line(frame, lineno)
        for name in copied:
            found = re.match(rf"self\.{name}\s*=\s*(?:self\.)?config\.(\w+)$", source)
            if found and unset(found.group(1)):
                names.append(found.group(1))
    return list(dict.fromkeys(names))


def _message(err: BaseException) -> str:
    return " ".join(str(err).split()) or "no message"


def transformers_failure(
    config: PretrainedConfig, err: BaseException, action: str
) -> UnsupportedFeature | None:
    """``err`` as an unsupported feature of the transformers module that raised it while ``action``
    ("cannot build it", "fails on a probe input"); None when ``err`` was not raised in a transformers
    modeling file (the innermost frame is elsewhere: a bug of the caller, not of the config)."""
    frame, innermost = _innermost_transformers_frame(err), _innermost_frame(err)
    if frame is None or (frame is not innermost and not _is_library_frame(innermost)):
        return None
    this = frame.f_locals.get("self")
    owner = type(this).__name__ if this is not None else type(config).__name__
    where = f"{owner} ({frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})"
    unset = _unset_fields(config, frame)
    if unset:
        fields = ", ".join(f"config.{name}" for name in unset)
        return UnsupportedFeature(
            where,
            f"transformers {action}: {fields} unset (None)",
            "set it as the checkpoint's config.json does",
        )
    return UnsupportedFeature(
        where,
        f"transformers {action}: `{_line(frame, frame.f_lineno)}` raised {type(err).__name__}: {_message(err)}",
    )


def _is_library_frame(frame: FrameType | None) -> bool:
    """A frame of torch or transformers itself (an op or a helper called by the modeling file)."""
    if frame is None:
        return False
    name = frame.f_code.co_filename
    return "/torch/" in name or "/transformers/" in name


def unbuildable(config: PretrainedConfig, err: BaseException) -> UnsupportedFeature:
    """The one-line reason transformers raised ``err`` building its model from ``config``."""
    subject = type(config).__name__
    packages = _MISSING_PACKAGE.findall(str(err))
    if isinstance(err, ImportError) and packages:
        return UnsupportedFeature(
            subject,
            f"its transformers model needs packages that are not installed: {', '.join(packages)}",
            f"pip install {' '.join(_PIP_NAMES.get(p, p) for p in packages)}",
        )
    found = transformers_failure(config, err, "cannot build it from this config")
    return found or UnsupportedFeature(
        subject,
        f"transformers cannot build its model from this config ({type(err).__name__}: {_message(err)})",
    )
