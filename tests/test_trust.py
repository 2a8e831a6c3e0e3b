"""Trust (issue 28): a serving directory from elsewhere runs no code and reads nothing outside
itself; a manifest of the wrong shape is a one-line error.

The crafted archives are real attacks: each is first shown to write its marker file through
torch's own unprotected loader (the oracle), then refused by ours with the marker absent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import types
import zipfile
from pathlib import Path

import pytest
import torch

from mlet_dist import cli
from mlet_dist.serving.manifest import MANIFEST, ServingError, read_manifest, write_manifest
from mlet_dist.serving.predict import load_predictor
from mlet_dist.serving.safe_load import check_graph

PREDICTOR = "serving/predictor.pt2"


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, dense, values, lengths):
        return torch.sigmoid(self.linear(dense)).squeeze(-1)


class _Marker:
    """Unpickling it creates ``path`` (what a hostile pickle would do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickled_marker(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Marker(marker), buffer)
    return buffer.getvalue()


def _inputs():
    return torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), torch.ones(4, dtype=torch.int32)


@pytest.fixture(scope="module")
def program_bytes() -> bytes:
    program = torch.export.export(_Tiny(), _inputs())
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _rewrite(data: bytes, edit) -> bytes:
    """The archive with ``edit(name, bytes) -> bytes | None`` applied to each entry (None drops
    it); ``edit`` may return extra entries under the key ``None`` of its ``extra`` dict."""
    extra: dict[str, bytes] = {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            new = edit(name, src.read(name), extra)
            if new is not None:
                dst.writestr(name, new)
        for name, payload in extra.items():
            dst.writestr(name, payload)
    return out.getvalue()


def _pickled_weight(marker: Path):
    def edit(name, payload, extra):
        if name.endswith("model_weights_config.json"):
            config = json.loads(payload)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        if "/data/weights/weight_" in name:
            return _pickled_marker(marker)
        return payload

    return edit


def _pickled_sample_inputs(marker: Path):
    def edit(name, payload, extra):
        return _pickled_marker(marker) if "/data/sample_inputs/" in name else payload

    return edit


def _opaque_constant(marker: Path):
    import pickle

    def edit(name, payload, extra):
        if name.endswith("model_constants_config.json"):
            prefix = name.split("/", 1)[0]
            extra[f"{prefix}/data/constants/opaque_obj_0"] = pickle.dumps(_Marker(marker))
            config = json.loads(payload)
            config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                        "use_pickle": True, "tensor_meta": None}  # fmt: skip
            return json.dumps(config).encode()
        return payload

    return edit


def _legacy_weights(marker: Path):
    def edit(name, payload, extra):
        if name.endswith("model_weights_config.json"):
            extra[name.replace("model_weights_config.json", "model.pt")] = _pickled_marker(marker)
            return None
        return None if "/data/weights/weight_" in name else payload

    return edit


CRAFTED = {
    "pickled weights": _pickled_weight,
    "pickled sample inputs": _pickled_sample_inputs,
    "opaque pickled constant": _opaque_constant,
    "legacy pickled weights file": _legacy_weights,
}


def _serving_dir(root: Path, predictor: bytes) -> Path:
    (root / "serving").mkdir(parents=True)
    (root / PREDICTOR).write_bytes(predictor)
    write_manifest(
        root, {"serving": {"dtype": "fp32", "artifacts": {"export": {"path": PREDICTOR}}}}
    )
    return root


def test_an_intact_program_loads_and_predicts(program_bytes, tmp_path) -> None:
    predictor, manifest = load_predictor(_serving_dir(tmp_path / "s", program_bytes))
    assert predictor(*_inputs()).shape == (4,)
    assert manifest["predictor_used"] == "export"


@pytest.mark.parametrize("attack", sorted(CRAFTED))
def test_a_crafted_predictor_runs_no_code_and_is_refused_in_one_line(
    attack, program_bytes, tmp_path, capsys
) -> None:
    marker = tmp_path / "marker"
    crafted = _rewrite(program_bytes, CRAFTED[attack](marker))
    # the oracle: torch's own loader runs the pickle (the attack is real)
    try:
        torch.export.load(io.BytesIO(crafted)).module()
    except Exception:
        pass
    assert marker.exists(), f"the {attack} archive does not attack torch.export.load"
    marker.unlink()
    capsys.readouterr()  # torch's own warnings
    served = _serving_dir(tmp_path / "s", crafted)
    with pytest.raises(ServingError, match="refusing to load|Weights only load"):
        load_predictor(served)
    assert not marker.exists()
    code = cli.main(["predict", "--serving", str(served), "--data", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "p.txt")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "predictor.pt2" in err, err
    assert not marker.exists() and not (tmp_path / "p.txt").exists()


def test_compiled_code_inside_an_export_archive_is_refused(program_bytes, tmp_path) -> None:
    def edit(name, payload, extra):
        if name.endswith("archive_version"):
            extra[name.replace("archive_version", "data/aotinductor/model/x.so")] = b"\x7fELF"
        return payload

    served = _serving_dir(tmp_path / "s", _rewrite(program_bytes, edit))
    with pytest.raises(ServingError, match="AOTInductor code"):
        load_predictor(served)


def test_a_graph_calling_python_functions_is_refused(tmp_path) -> None:
    """torch.export's deserializer resolves any ``torch.<attr>`` name (``torch.os.system``):
    only operators may be called."""

    for target, op in ((os.system, "call_function"), (torch.os.getcwd, "call_function"),
                       ("add", "call_method")):  # fmt: skip
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        graph.output(graph.create_node(op, target, (x,) if op == "call_method" else ("true",)))
        gm = torch.fx.GraphModule(torch.nn.Module(), graph)
        with pytest.raises(ServingError, match="its graph calls"):
            check_graph(types.SimpleNamespace(graph_module=gm), "p.pt2")
    ok = torch.export.export(_Tiny(), _inputs())
    check_graph(ok, "p.pt2")  # operators only


def test_weights_only_loading_also_guards_torchscript(tmp_path) -> None:
    from mlet_dist.serving.artifacts import ARTIFACTS

    marker = tmp_path / "marker"
    scripted = torch.jit.script(torch.nn.Linear(2, 1))
    path = tmp_path / "p.pt"
    torch.jit.save(scripted, str(path))
    assert ARTIFACTS["torchscript"].load(str(path))(torch.ones(1, 2)).shape == (1, 1)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the load
    assert not marker.exists()


# -- manifests: paths stay inside, keys and types are checked -------------------------------------


@pytest.fixture
def served(program_bytes, tmp_path) -> Path:
    return _serving_dir(tmp_path / "served", program_bytes)


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def _set(*keys, value):
    def edit(manifest):
        node = manifest
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


ESCAPES = {
    "parent predictor": lambda m: m["serving"]["artifacts"]["export"].update(path="../x.pt2"),
    "absolute predictor": lambda m: m["serving"]["artifacts"]["export"].update(path="/etc/passwd"),
    "parent file": lambda m: m["files"].append(
        {"path": "serving/../../x", "bytes": 1, "sha256": "0"}
    ),
    "absolute vocabulary": _set("serving", "vocabularies", value={"t": "/etc/passwd"}),
    "parent table file": _set(
        "tables", value=[{"rows": 1, "features": ["f"], "parquet": ["../p"]}]
    ),
    "model config": _set("model", value={"config": "../../config.json"}),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_manifest_paths_must_stay_inside_the_directory(case, served, tmp_path) -> None:
    _edit_manifest(served, ESCAPES[case])
    with pytest.raises(ServingError, match="is not inside the serving directory"):
        load_predictor(served)


def test_a_symlink_out_of_the_directory_is_not_followed(program_bytes, served, tmp_path) -> None:
    outside = tmp_path / "elsewhere.pt2"
    outside.write_bytes(program_bytes)
    (served / PREDICTOR).unlink()
    (served / PREDICTOR).symlink_to(outside)  # the checksums still match: the same bytes
    with pytest.raises(ServingError, match="link out of it"):
        load_predictor(served)
    # a link that stays inside is a path like any other
    (served / PREDICTOR).unlink()
    shutil.copy(outside, served / "serving/real.pt2")
    (served / PREDICTOR).symlink_to(served / "serving/real.pt2")
    _edit_manifest(served, lambda m: m.update(files=[f for f in m["files"] if f["path"] != "serving/real.pt2"]))  # fmt: skip
    load_predictor(served, verify="predictor")


MALFORMED = {
    "a list": lambda m: m.clear() or None,
    "files not a list": _set("files", value={"a": 1}),
    "files missing": lambda m: m.pop("files"),
    "a file without sha256": lambda m: m["files"][0].pop("sha256"),
    "bytes a string": lambda m: m["files"][0].update(bytes="12"),
    "bytes a bool": lambda m: m["files"][0].update(bytes=True),
    "serving a string": _set("serving", value="x"),
    "artifacts a list": _set("serving", "artifacts", value=["serving/predictor.pt2"]),
    "artifact path a number": _set("serving", "artifacts", "export", "path", value=3),
    "tables rows a string": _set("tables", value=[{"rows": "9", "features": ["f"]}]),
    "source config a list": _set("source", value={"config": []}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_manifest_of_the_wrong_shape_is_one_line(case, served, tmp_path, capsys) -> None:
    if case == "a list":
        (served / MANIFEST).write_text("[1, 2]")
    else:
        _edit_manifest(served, MALFORMED[case])
    with pytest.raises(ServingError):
        read_manifest(served)
    code = cli.main(["predict", "--serving", str(served), "--data", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "p.txt")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and MANIFEST in err, err
