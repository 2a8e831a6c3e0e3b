"""The README's "Config keys" tables, made from the config dataclasses' field docs (one place per
fact: ``tests/test_config_and_metrics.py`` checks that the README holds exactly this text).

    python -m mlet_dist.config_doc    # prints the Markdown
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing

from mlet_dist import config as config_module
from mlet_dist.config import Config


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string statement after it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in itertools.pairwise(body):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr):
            if isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())  # type: ignore[attr-defined]
    return docs


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(value, list) and len(value) > 8:
        return f"`[{len(value)} values]`"
    return f"`{value!r}`"


def markdown() -> str:
    """One table per config section, in the order of :class:`Config`."""
    out = []
    for section in dataclasses.fields(Config):
        cls = (
            getattr(config_module, section.type) if isinstance(section.type, str) else section.type
        )
        doc = " ".join((cls.__doc__ or "").split())
        out += [f"**[{section.name}]** — {doc}", "", "| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            out.append(f"| `{f.name}` | {_default(f)} | {docs.get(f.name, '')} |")
        out.append("")
        # Arrays of tables ([[data.sparse]]): one table of the keys of an item.
        for name, tp in typing.get_type_hints(cls).items():
            args = typing.get_args(tp)
            if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
                item = args[0]
                doc = " ".join((item.__doc__ or "").split())
                out += [
                    f"**[[{section.name}.{name}]]** — {doc}",
                    "",
                    "| key | default | meaning |",
                    "|---|---|---|",
                ]
                item_docs = field_docs(item)
                for f in dataclasses.fields(item):
                    out.append(f"| `{f.name}` | {_default(f)} | {item_docs.get(f.name, '')} |")
                out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
