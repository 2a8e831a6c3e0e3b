"""The counting rules of benchmarks/walk.py on small synthetic code, against counts by hand."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.walk import (
    Event,
    Walker,
    WalkResult,
    compress,
    import_reach,
    static_counts,
    walked_once,
)

# A package of three modules (and one library module outside it) whose walk is known by hand.
PACKAGE = {
    "walkdemo/__init__.py": "",
    "walkdemo/a.py": """
        import libmod
        from walkdemo import b, c


        def main(loss):
            helper()  # same module: no event
            b.f()  # > b:f, b.f -> b.g (same file) -> c.h: > c:h, < b:g, then < a:main
            for _ in range(3):
                b.tiny()  # (> b:tiny, < a:main) x3
            for _ in b.gen():  # a generator: each resumption a call, each yield a return
                pass  # (> b:gen, < a:main) x3: two yields and the end
            libmod.apply(c.cb)  # library code calls back: > c:cb (from a), < a:main
            try:
                b.boom()  # > b:boom, < a:main (an exception leaving a frame is a return)
            except ValueError:
                pass
            loss()  # the end point
            b.f()  # after the end: not in the walk (c.h still counted for the command)


        def helper():
            return 1
        """,
    "walkdemo/b.py": """
        from walkdemo import c


        def f():
            return g()


        def g():
            return c.h()


        def tiny():
            return 0


        def gen():
            yield 1
            yield 2


        def boom():
            raise ValueError("boom")
        """,
    "walkdemo/c.py": """
        def h():
            return 2


        def cb():
            return 3
        """,
    "walkdemo/sub/__init__.py": "def top():\n    return 0\n",
    "walkdemo/sub/deep.py": "def leaf():\n    return 0\n",
    "libmod.py": """
        def apply(fn):
            return fn()
        """,
}


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for rel, text in PACKAGE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "libmod" or m.startswith("walkdemo")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in [m for m in sys.modules if m == "libmod" or m.startswith("walkdemo")]:
        del sys.modules[name]


def loss() -> None:
    """The end point of the demo walk (library code, like torch's backward)."""


def test_walk_counts_stops_and_climbs_by_hand(demo: Path) -> None:
    a = importlib.import_module("walkdemo.a")
    walker = Walker(demo / "walkdemo", "walkdemo", end_codes=[loss.__code__], count=["h"])
    walk, _ = walker.run("demo", lambda: a.main(loss))

    A, B, C = "walkdemo.a", "walkdemo.b", "walkdemo.c"

    def stop(module: str, function: str, came_from: str, depth: int) -> Event:
        return Event("stop", module, function, came_from, depth)

    def climb(module: str, function: str, came_from: str, depth: int) -> Event:
        return Event("climb", module, function, came_from, depth)

    back = climb(A, "main", B, 0)
    expected = [
        Event("start", A, "main", "", 0),
        stop(B, "f", A, 1),
        stop(C, "h", B, 2),
        climb(B, "g", C, 1),
        back,
        *[stop(B, "tiny", A, 1), back] * 3,
        *[stop(B, "gen", A, 1), back] * 3,
        stop(C, "cb", A, 1),
        climb(A, "main", C, 0),
        stop(B, "boom", A, 1),
        back,
    ]
    assert walk.events == expected
    assert (walk.stops, walk.climbs) == (10, 10)
    # loops once: the tiny and gen loops count one stop and one climb each
    assert (walk.stops_once, walk.climbs_once) == (6, 6)
    assert walk.distinct_stops == 6  # b:f, c:h, b:tiny, b:gen, c:cb, b:boom
    assert walk.modules == [A, B, C]
    assert walk.end_chain == [A] and walk.ended == "call of loss"
    assert walk.calls_in_walk == {"h": 1} and walk.calls_in_command == {"h": 2}


def test_walk_without_end_point_and_module_names(demo: Path) -> None:
    b = importlib.import_module("walkdemo.b")
    deep = importlib.import_module("walkdemo.sub.deep")
    sub = importlib.import_module("walkdemo.sub")
    walker = Walker(demo / "walkdemo", "walkdemo")
    walk, value = walker.run("f", b.f)
    assert value == 2 and walk.ended == ""
    assert [e.kind for e in walk.events] == ["start", "stop", "climb"]
    assert (walk.stops, walk.climbs, walk.end_chain) == (1, 1, [])
    assert walker.module_of(deep.leaf.__code__) == "walkdemo.sub.deep"
    assert walker.module_of(sub.top.__code__) == "walkdemo.sub"
    assert walker.module_of(loss.__code__) is None  # outside the package


def test_compress_and_walked_once() -> None:
    assert compress([1, 1, 1, 2, 3, 2, 3, 4]) == [([1], 3), ([2, 3], 2), ([4], 1)]
    assert compress([]) == []
    # a loop inside a loop: (x (y z) x2) x3, then w
    inner = ["x", "y", "z", "y", "z"]
    assert compress(inner * 3 + ["w"]) == [(inner, 3), (["w"], 1)]
    ev = [Event("stop", m, "f", "a", 1) for m in "xyz"]
    x, y, z = ev
    assert walked_once([x, y, z, y, z] * 3 + [x]) == [x, y, z, x]


SNIPPET = """
from __future__ import annotations

import mlet_dist
from x import Config, DataConfig, MyConfig, init_distributed, mod, schema_of


def f(cfg: Config, data: DataConfig) -> None:
    s = schema_of(cfg.data)
    if cfg.data.source == "criteo":
        pass
    elif data.source in ("avazu", "movielens"):
        pass
    if source != "x":
        pass
    if cfg.data.source == s:
        pass
    g = schema_of
    return g


def _f(cfg: "Config | None" = None, *, a=1, b=2, **kw):
    mod.schema_of(cfg.data)
    init_distributed(cfg.dist)
    match cfg.data.source:
        case "a":
            pass
        case "b":
            pass


class C:
    @staticmethod
    def m(config: mlet_dist.config.Config, other: MyConfig):
        def inner(c: Config):
            return c

        return inner


def n(x: MyConfig, y: list[Config]):
    return 0
"""


def test_static_counts_of_a_known_snippet(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "s.py").write_text(SNIPPET)
    (pkg / "__init__.py").write_text("def tiny(a, b, c, d):\n    return schema_of(a)\n")
    counts = static_counts(pkg)
    assert counts.call_sites["schema_of"] == {"pkg/__init__.py": 1, "pkg/sub/s.py": 2}
    assert counts.call_sites["init_distributed"] == {"pkg/sub/s.py": 1}
    assert counts.call_sites["load_run_config"] == {}
    assert counts.total("schema_of") == 3
    assert counts.config_signatures == [
        "pkg/sub/s.py:f(cfg)",
        "pkg/sub/s.py:_f(cfg)",
        "pkg/sub/s.py:C.m(config)",
        "pkg/sub/s.py:C.m.<locals>.inner(c)",
        "pkg/sub/s.py:n(y)",  # list[Config] names the whole Config too
    ]
    assert counts.config_params == 5
    # ==, in, != against strings (3) and two match cases; not the comparison with a variable
    assert counts.source_switches == {"pkg/sub/s.py": 5}
    assert counts.source_switch_text == 3  # source == (twice), source != (once)
    assert counts.twins == ["pkg/sub/s.py: f / _f"]
    by_name = {fn.where: fn for fn in counts.functions}
    assert by_name["pkg/sub/s.py:f"].lines == 12 and by_name["pkg/sub/s.py:f"].params == 2
    assert by_name["pkg/sub/s.py:_f"].params == 4  # cfg, a, b, kw
    assert by_name["pkg/sub/s.py:C.m"].lines == 6  # with its decorator
    assert by_name["pkg/sub/s.py:C.m"].params == 2
    assert counts.largest(1)[0].where == "pkg/sub/s.py:f"
    assert counts.most_params(1)[0].where == "pkg/__init__.py:tiny"
    assert counts.files == 2
    assert counts.lines == len(SNIPPET.splitlines()) + 2


def test_static_report_of_this_checkout(tmp_path: Path) -> None:
    """The tool's static part on mlet_dist itself (the walks take ~20 s: run by hand)."""
    from benchmarks import walk

    out = tmp_path / "walk.md"
    assert walk.main(["--out", str(out), "--static-only"]) == 0
    text = out.read_text()
    readme = len((walk.REPO / "README.md").read_text().splitlines())
    assert f"README.md: {readme} lines" in text
    assert "call sites of `schema_of(`" in text and "## The train walk" not in text


def test_calls_back_up_the_layers(tmp_path: Path) -> None:
    """Import reach by hand: top imports mid (inside a function too), mid imports low.low2; a call
    from low2 into top (a callback handed down) climbs the layers across packages, one from
    mid into top within the package does not count across packages."""
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("def f():\n    import pkg.mid\n")
    (pkg / "mid.py").write_text("from pkg.low import low2\n")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "low2.py").write_text("import os\n")
    reach = import_reach(pkg, "pkg")
    assert reach["pkg.top"] == {"pkg.mid", "pkg.low", "pkg.low.low2"}
    assert reach["pkg.mid"] == {"pkg.low", "pkg.low.low2"}
    assert reach["pkg.low.low2"] == set()
    w = WalkResult("demo", reach=reach)
    w.events = [
        Event("start", "pkg.top", "f", "", 0),
        Event("stop", "pkg.mid", "g", "pkg.top", 1),  # down: not counted
        Event("stop", "pkg.low.low2", "h", "pkg.mid", 2),  # down
        Event("stop", "pkg.top", "callback", "pkg.low.low2", 3),  # up, across packages
        Event("climb", "pkg.low.low2", "h", "pkg.top", 2),
        Event("climb", "pkg.mid", "g", "pkg.low.low2", 1),
        Event("stop", "pkg.top", "other", "pkg.mid", 2),  # up, one package
    ]
    assert [e.function for e in w.upward] == ["callback", "other"]
    summary = w.summary()
    assert summary["upward_calls"] == 2 and summary["upward_calls_across_packages"] == 1
