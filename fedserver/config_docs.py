"""Renders the run-config keys for ``pyproject.toml`` and the README from :class:`RunConfig`.

Tests compare both files against these renderings, so a key added to the config without
documenting it (or documented with another default) fails the suite.
"""

from __future__ import annotations

from fedserver.config import key_specs


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    return str(value)


def pyproject_block() -> str:
    """The body of ``[tool.flwr.app.config]``: every key with its default."""
    return "\n".join(f"{s['name']} = {toml_value(s['default'])}" for s in key_specs())


def readme_table() -> str:
    """Markdown table of every key: section, meaning, default, allowed values."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    section = None
    for s in key_specs():
        if s["section"] != section:
            section = s["section"]
            lines.append(f"| **{section}** | | | |")
        lines.append(
            f"| `{s['name']}` | `{toml_value(s['default'])}` | {s['allowed']} | {s['help']} |"
        )
    return "\n".join(lines)
