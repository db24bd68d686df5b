"""``python -m largelm.parallel``: print every library patch largelm installs (``largelm.parallel.ALL_PATCHES``)."""

from __future__ import annotations

import textwrap

from largelm.parallel import ALL_PATCHES
from largelm.parallel.patches import Patch


def describe(patch: Patch, width: int = 100) -> str:
    """One patch as an indented block: name, library and scope, then one wrapped line per field."""
    lines = [f"{patch.name}  [{patch.library}, {patch.scope}]"]
    for label in ("target", "replaces", "why", "when", "test"):
        lines += textwrap.wrap(getattr(patch, label), width=width, initial_indent=f"    {label + ':':10}",
                               subsequent_indent=" " * 14,
                               break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def main() -> None:
    print(f"{len(ALL_PATCHES)} library patches (largelm.parallel.ALL_PATCHES; docs/design.md 'Library adaptations')\n")
    print("\n\n".join(describe(patch) for patch in ALL_PATCHES))


if __name__ == "__main__":
    main()
