"""The custom models' ``__init__.py`` edit: sorted import and ``__all__`` entry in the file's own style."""

from __future__ import annotations

import pytest

from onboardlm.pr.init_edit import add_model_import
from onboardlm.pr.layout import PrError


def test_appended_last_in_a_one_line_list_with_its_quotes() -> None:
    text = "from .modeling_a import AForCausalLM\n\n__all__ = ['AForCausalLM']\n"
    assert add_model_import(text, "modeling_z", "ZForCausalLM", "init") == (
        "from .modeling_a import AForCausalLM\nfrom .modeling_z import ZForCausalLM\n\n"
        "__all__ = ['AForCausalLM', 'ZForCausalLM']\n"
    )


def test_first_in_a_multiline_tuple_with_a_trailing_comma() -> None:
    text = 'from .modeling_m import MForCausalLM\n\n__all__ = (\n    "MForCausalLM",\n)\n'
    assert add_model_import(text, "modeling_b", "BForCausalLM", "init") == (
        "from .modeling_b import BForCausalLM\nfrom .modeling_m import MForCausalLM\n\n"
        '__all__ = (\n    "BForCausalLM",\n    "MForCausalLM",\n)\n'
    )


def test_a_file_without_imports_or_all_gets_the_line_after_its_docstring() -> None:
    text = '"""Custom models."""\n\nX = 1\n'
    assert (
        add_model_import(text, "modeling_b", "B", "init")
        == '"""Custom models."""\nfrom .modeling_b import B\n\nX = 1\n'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("from .modeling_b import Other\n", "imports .modeling_b already"),
        ("from .modeling_c import BForCausalLM\n", "binds BForCausalLM already"),
    ],
)
def test_an_existing_module_or_class_is_refused(text: str, message: str) -> None:
    with pytest.raises(PrError, match=message):
        add_model_import(text, "modeling_b", "BForCausalLM", "init")


def test_last_in_a_multiline_tuple_of_one() -> None:
    text = '__all__ = (\n    "AForCausalLM",\n)\n'
    assert add_model_import(text, "modeling_z", "ZForCausalLM", "init") == (
        'from .modeling_z import ZForCausalLM\n__all__ = (\n    "AForCausalLM",\n    "ZForCausalLM",\n)\n'
    )
