"""The import rewrite on its own: what maps where, what is refused, and that nothing else changes."""

from __future__ import annotations

import pytest

from onboardlm.pr.imports import rewrite_imports
from onboardlm.pr.layout import PrError

AD = "tensorrt_llm._torch.auto_deploy"


def test_each_rule() -> None:
    source = (
        "import torch\n"
        "import onboardlm.ops  # noqa: F401  (registers the ops)\n"
        "import modeling_x\n"
        "from onboardlm.ops import ActivationType\n"
        "from onboardlm.testing import assert_rmse_close as close, unit_embeddings\n"
        "from onboardlm.testing.transfer import transfer_weights\n"
        "\n\ndef f():\n    from onboardlm.export import torch_export_to_gm\n    return torch.ops.auto_deploy.x(1)\n"
    )
    rewritten = rewrite_imports(source, "f.py", local_modules=["modeling_x"]).text
    assert rewritten == (
        "import torch\n"
        f"import {AD}.custom_ops  # noqa: F401  (registers the ops)\n"
        f"from {AD}.models.custom import modeling_x\n"
        "from tensorrt_llm._torch.utils import ActivationType\n"
        "from _model_test_utils import assert_rmse_close as close\n"
        "from _lean_model_test_utils import unit_embeddings\n"
        "from _lean_model_test_utils import transfer_weights\n"
        f"\n\ndef f():\n    from {AD}.export import torch_export_to_gm\n    return torch.ops.auto_deploy.x(1)\n"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("from onboardlm.review import review_model_file\n", "imports from onboardlm.review, which has no"),
        (
            "from onboardlm.testing import tiny_config\n",
            "imports onboardlm.testing.tiny_config, which has no",
        ),
        ("import onboardlm.runtime\n", "imports onboardlm.runtime, which has no"),
        ("from onboardlm.export import *\n", "imports * from onboardlm.export"),
        ("import torch; import onboardlm.ops\n", "shares its line with other statements"),
        ("x = onboardlm.ops.ActivationType\n", "still uses onboardlm (line 1)"),
    ],
)
def test_what_has_no_counterpart_is_refused_by_name(source: str, message: str) -> None:
    with pytest.raises(PrError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        rewrite_imports(source, "f.py")
