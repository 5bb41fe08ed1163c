"""``python -m onboardlm.cli``: the same as the ``onboardlm`` command."""

from onboardlm.cli import main

main()
