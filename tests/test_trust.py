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
    batch = {0: torch.export.Dim("batch")}  # a dynamic size: the program holds shape expressions
    program = torch.export.export(_Tiny(), _inputs(), dynamic_shapes=(batch, None, None))
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


def _program_json(edit_program):
    def edit(name, payload, extra):
        if name.endswith("models/model.json"):
            program = json.loads(payload)
            edit_program(program)
            return json.dumps(program).encode()
        return payload

    return edit


def _touch(marker: Path) -> str:
    return f"__import__('pathlib').Path('{marker}').touch()"


def _shape_expression(marker: Path):
    """torch.export's deserializer hands shape expressions to ``sympy.sympify`` (eval)."""

    def edit(program):
        size = program["graph_module"]["graph"]["tensor_values"]["dense"]["sizes"][0]
        size["as_expr"]["expr_str"] += f" + 0*len(str({_touch(marker)}))"

    return _program_json(edit)


def _guard(marker: Path):
    """``ExportedProgram.module()`` compiles the program's guards with ``exec``."""

    def edit(program):
        program["guards_code"] = [f"L['dense'].size()[1] == 3 and {_touch(marker)} is None"]

    return _program_json(edit)


CRAFTED = {
    "shape expression": _shape_expression,
    "guard": _guard,
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
    assert predictor(torch.randn(7, 3), *_inputs()[1:]).shape == (7,)  # the dynamic batch
    assert manifest["predictor_used"] == "export"


@pytest.mark.parametrize("attack", sorted(CRAFTED))
def test_a_crafted_predictor_runs_no_code_and_is_refused_in_one_line(
    attack, program_bytes, tmp_path, capsys
) -> None:
    marker = tmp_path / "marker"
    crafted = _rewrite(program_bytes, CRAFTED[attack](marker))
    # the oracle: torch's own loader runs the pickle (the attack is real)
    try:
        torch.export.load(io.BytesIO(crafted)).module()(*_inputs())
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


@pytest.mark.parametrize(
    "key,text",
    [
        ("name", 'x"); import os; ("'),
        ("target", "torch.ops.aten.add\nimport os"),
        ("as_name", "a b"),
        ("stack_trace", 'File "x", line 1, in f\rimport os'),
        ("nn_module_stack", "L['self']\nimport os"),
        ("expr_str", "exec(bytes((105, 109)))"),
        ("expr_str", "Symbol('s0').__class__"),
        ("expr_str", "Symbol('s0'), open('x')"),
        ("guards_code", "L['dense'].size()[0] == 4 and open('x')"),
        ("guards_code", "L['dense'].__class__"),
    ],
)
def test_program_text_torch_would_run_is_refused(key, text) -> None:
    from mlet_dist.serving.safe_load import check_program_json

    with pytest.raises(ServingError, match="which torch would run"):
        check_program_json({"graph_module": {"nodes": [{key: text}]}}, "models/model.json", "p.pt2")
    good = {
        "expr_str": "Add(Mul(Integer(26), Symbol('s37', positive=True, integer=True)), Integer(1))",
        "guards_code": "(L['lengths'].size()[0] // 26) == L['dense'].size()[0]",
        "name": "dlrm.sparse_arch.tbes.0.weights_host",
        "stack_trace": 'File "m.py", line 3, in forward\n    return x',
    }
    check_program_json({"nodes": [{k: v} for k, v in good.items()]}, "models/model.json", "p.pt2")


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


@pytest.mark.parametrize("kind", ["torchscript", "aoti"])
def test_the_other_loaders_force_weights_only_torch_loads(kind, tmp_path, monkeypatch) -> None:
    """Inside the TorchScript and AOTInductor loaders, a torch.load that asks for
    weights_only=False (as torch's own loaders do) still refuses a pickle that runs code."""
    from mlet_dist.serving.artifacts import ARTIFACTS

    marker = tmp_path / "marker"
    payload = _pickled_marker(marker)
    refused = []

    def load(*args, **kwargs):  # stands in for torch.jit.load / aoti_load_package
        try:
            torch.load(io.BytesIO(payload), weights_only=False)
        except Exception as e:  # the unpickler refuses it
            refused.append(type(e).__name__)
        return "loaded"

    monkeypatch.setattr(torch.jit, "load", load)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    assert ARTIFACTS[kind].load(str(tmp_path / "p")) == "loaded"
    assert refused == ["UnpicklingError"] and not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the load
    torch.load(io.BytesIO(payload), weights_only=False)  # outside: torch's default behaviour
    assert marker.exists()  # (the oracle: the payload is a real attack)


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


# -- config and sweep validation ------------------------------------------------------------------

from mlet_dist.config import ConfigError, load_config  # noqa: E402
from mlet_dist.sweep.spec import load_sweep  # noqa: E402

BAD_KEYS = [
    "--optim.embedding_lr=-0.1",
    "--optim.dense_lr=-1e-3",
    "--optim.dense_lr=0.0",
    "--optim.embedding_lr=nan",
    "--optim.projection_lr=-0.02",
    "--optim.eps=0.0",
    "--optim.warmup_steps=-1",
    "--optim.decay_steps=-5",
    "--train.log_every=0",
    "--train.epochs=0",
    "--train.epochs=-1",
    "--train.max_steps=-1",
    "--train.checkpoint_every=-1",
    "--train.seed=-3",
    "--data.eval_batch_size=0",
    "--data.max_rows=-1",
    "--model.inner_dim=-64",
    "--model.projection_init_std=-1.0",
    "--model.dense_arch_layer_sizes=[-4, 16]",
    "--dist.hbm_cap_gb=-1.0",
    "--dist.ddr_cap_gb=inf",
    "--dist.min_partition=-4",
    "--synthetic.dense_missing_rate=1.5",
    "--synthetic.zipf_exponent=-1.0",
]


@pytest.mark.parametrize("override", BAD_KEYS)
def test_a_value_out_of_range_is_refused_naming_the_key(override, capsys) -> None:
    key = override[2:].split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
    code = cli.main(["train", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and key in err, err


@pytest.mark.parametrize(
    "text",
    [
        "dims = 8\n[[baseline]]\nname='a'\n",
        "dims = ['8']\n[[baseline]]\nname='a'\n",
        "inner_dims = [true]\n[[baseline]]\nname='a'\n",
        "inner_dims = []\nbaseline = 'a'\n",
        "inner_dims = []\nbaseline = ['a']\n",
        "inner_dims = []\n[baseline]\nname='a'\n",
        "inner_dims = []\n[[baseline]]\nname=3\n",
        "inner_dims = []\n[[baseline]]\nname='a'\nset = 'optim.dense_lr=1'\n",
        "inner_dims = []\n[[baseline]]\nname='a'\ngrid = {'optim.dense_lr' = 0.1}\n",
        "inner_dims = []\n[[baseline]]\nname='a'\ngrid = {'optim.dense_lr' = []}\n",
        "inner_dims = []\nepsilon = nan\n[[baseline]]\nname='a'\n",
        "inner_dims = []\nepsilon = -0.1\n[[baseline]]\nname='a'\n",
        "inner_dims = []\nseeds = 1.5\n[[baseline]]\nname='a'\n",
    ],
)
def test_a_malformed_sweep_file_is_one_line(text, tmp_path, capsys) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_sweep(path)
    code = cli.main(["sweep", "--sweep", str(path), "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err, err


def test_a_failing_sweep_run_is_one_line_naming_the_run_and_its_log(tmp_path, capsys) -> None:
    from mlet_dist.sweep.runner import SweepRunError, run_all
    from mlet_dist.sweep.spec import RunSpec

    cfg = load_config(None, [f"--data.dir={tmp_path / 'missing'}",
                             f"--train.run_dir={tmp_path / 'w' / 'runs' / 'r1'}"])  # fmt: skip
    run = RunSpec("tune", "baseline", 0, 8, "a", {}, 0, cfg.to_dict(), 1)
    with pytest.raises(SweepRunError) as e:
        run_all([run], jobs=1, threads=1, keep=False)
    message = str(e.value)
    log = tmp_path / "w" / "runs" / "r1.log"
    assert len(message.splitlines()) == 1 and str(run.run_dir) in message and str(log) in message
    last = log.read_text().strip().splitlines()[-1]
    assert "missing" in last and last[-100:] in message  # the run's own error, and its log


def _criteo_tsv(path: Path, rows: int = 64) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    lines = [
        "\t".join(
            [
                str(int(rng.integers(0, 2))),
                *(str(int(v)) for v in rng.integers(0, 9, 13)),
                *(f"{int(v):08x}" for v in rng.integers(0, 50, 26)),
            ]
        )
        for _ in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_table_that_cannot_fit_is_the_plan_commands_message_in_train(tmp_path, capsys) -> None:
    data = _criteo_tsv(tmp_path / "d.tsv")
    args = ["--data.source=criteo", f"--data.train_files=['{data}']", "--dist.ddr_cap_gb=0.0001",
            "--data.num_embeddings_per_feature=" + str([5000] * 26), "--train.progress=false",
            f"--train.run_dir={tmp_path / 'run'}"]  # fmt: skip
    assert cli.main(["plan", *args, "--world-size", "1", "--device", "cpu",
                     "--out", str(tmp_path / "plan.json")]) == 1  # fmt: skip
    planned = capsys.readouterr().err
    assert "no sharding plan fits" in planned
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "no sharding plan fits" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    plan_message = " ".join(planned.split("mlet-dist plan:", 1)[1].split())
    assert plan_message in " ".join(err.split())  # the same message, with its checked fix
    assert not (tmp_path / "run" / "config.json").exists()
    # the same for evaluate, on a run trained where the tables fit
    fits = [a for a in args if "ddr_cap_gb" not in a and "num_embeddings" not in a]
    fits += ["--data.num_embeddings_per_feature=" + str([64] * 26), "--train.max_steps=2",
             "--data.batch_size=16"]  # fmt: skip
    code = cli.main(["train", *fits])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(tmp_path / "run"), "--split", "train",
                     "--dist.ddr_cap_gb=0.00001"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no sharding plan fits" in err and len(err.strip().splitlines()) == 1, err


# -- CSV and numeric edge cases -------------------------------------------------------------------

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from mlet_dist.config import DataConfig  # noqa: E402
from mlet_dist.data.columns import ColumnError  # noqa: E402
from mlet_dist.data.sources import source_of  # noqa: E402
from mlet_dist.schema import schema_of  # noqa: E402

COLUMNS_TOML = """
[data]
source = "files"
label = "y"
[[data.dense]]
name = "x"
[[data.sparse]]
name = "u"
num_embeddings = 1000
[[data.sparse]]
name = "n"
ids = "int"
num_embeddings = 1000
"""


@pytest.fixture
def columns_schema(tmp_path):
    (tmp_path / "c.toml").write_text(COLUMNS_TOML)
    return schema_of(load_config(tmp_path / "c.toml").data)


def _read(schema, path, csv_columns=()):
    return source_of(DataConfig(source="files", csv_columns=list(csv_columns)), schema).read(path)


def _hash(text: str, rows: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % rows


NULLISH = ["NA", "null", "nan", "N/A", "NULL", "None", "#N/A", "-nan", "NaN", "n/a", "1.#QNAN"]


def test_csv_ids_equal_the_same_parquet_values_pyarrows_null_strings_included(
    columns_schema, tmp_path
) -> None:
    n = len(NULLISH)
    pq.write_table(
        pa.table({"y": [1] * n, "x": [1.0] * n, "u": NULLISH, "n": list(range(n))}),
        tmp_path / "a.parquet",
    )
    lines = ["y,x,u,n", *(f"1,1.0,{v},{i}" for i, v in enumerate(NULLISH))]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    csv, parquet = _read(columns_schema, tmp_path / "a.csv"), _read(columns_schema, tmp_path / "a.parquet")  # fmt: skip
    expected = [_hash(v, 1000) for v in NULLISH]  # the documented hash of each string
    for rows in (csv, parquet):
        assert rows.ids[0][:, 0].tolist() == expected and rows.lengths[0].tolist() == [1] * n
    # only an empty field is missing (an empty bag), in both formats
    (tmp_path / "b.csv").write_text("y,x,u,n\n1,,,\n")
    empty = _read(columns_schema, tmp_path / "b.csv")
    assert empty.lengths[0].tolist() == [0] and empty.lengths[1].tolist() == [0]
    assert empty.dense.tolist() == [[0.0]]


@pytest.mark.parametrize("csv_columns", [(), ("y", "x", "u", "n")])
def test_a_byte_order_mark_hides_no_column(columns_schema, tmp_path, csv_columns) -> None:
    text = "y,x,u,n\n1,2.0,abc,7\n0,3.0,def,8\n"
    (tmp_path / "plain.csv").write_text(text)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    want = _read(columns_schema, tmp_path / "plain.csv", csv_columns)
    got = _read(columns_schema, tmp_path / "bom.csv", csv_columns)
    assert len(got.labels) == 2  # the header with its mark is skipped as a header
    np.testing.assert_array_equal(got.labels, want.labels)
    for a, b in zip(got.ids, want.ids):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("text", ["y,x,u,n\n", "y,x,u,n", "y,x,u,n\r\n"])
def test_a_header_only_csv_is_a_file_without_rows(columns_schema, tmp_path, text, capsys) -> None:
    path = tmp_path / "h.csv"
    path.write_text(text)
    assert len(_read(columns_schema, path).labels) == 0
    (tmp_path / "c2.toml").write_text(COLUMNS_TOML)
    code = cli.main(["train", "--config", str(tmp_path / "c2.toml"), f"--data.train_files=['{path}']",
                     f"--train.run_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no data rows" in err, err


def test_an_empty_csv_is_named_empty(columns_schema, tmp_path) -> None:
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ColumnError, match="the file is empty"):
        _read(columns_schema, tmp_path / "e.csv")


def test_uint64_ids_at_or_above_2_63_are_hashed_or_refused_in_one_line(tmp_path) -> None:
    big = [2**63, 2**64 - 1, 2**63 + 12345, 7]
    for ids, rows_of in (("hash", lambda v: v % 1000), ("int", None)):
        (tmp_path / f"{ids}.toml").write_text(COLUMNS_TOML.replace('ids = "int"', f'ids = "{ids}"'))
        schema = schema_of(load_config(tmp_path / f"{ids}.toml").data)
        path = tmp_path / f"{ids}.parquet"
        pq.write_table(pa.table({"y": [1] * 4, "x": [0.0] * 4, "u": ["a"] * 4,
                                 "n": pa.array(big, pa.uint64())}), path)  # fmt: skip
        if rows_of is None:
            with pytest.raises(ColumnError, match=f"id {2**63} is outside its table"):
                _read(schema, path)
            continue
        assert _read(schema, path).ids[1][:, 0].tolist() == [rows_of(v) for v in big]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_non_finite_dense_values_are_refused_naming_the_row(
    columns_schema, tmp_path, value
) -> None:
    (tmp_path / "d.csv").write_text(f"y,x,u,n\n1,1.0,a,1\n0,{value},b,2\n")
    with pytest.raises(ColumnError, match=r"column 'x'.*data row 2 holds"):
        _read(columns_schema, tmp_path / "d.csv")
    pq.write_table(pa.table({"y": [1, 0], "x": [1.0, float(value)], "u": ["a", "b"], "n": [1, 2]}),
                   tmp_path / "d.parquet")  # fmt: skip
    with pytest.raises(ColumnError, match=r"column 'x'.*data row 2 holds"):
        _read(columns_schema, tmp_path / "d.parquet")


def test_non_finite_eval_rows_fail_training_instead_of_a_nan_log_loss(tmp_path, capsys) -> None:
    (tmp_path / "c.toml").write_text(COLUMNS_TOML)
    rows = "\n".join(f"{i % 2},{i}.0,u{i % 5},{i % 9}" for i in range(64))
    (tmp_path / "train.csv").write_text("y,x,u,n\n" + rows + "\n")
    (tmp_path / "eval.csv").write_text("y,x,u,n\n1,1.0,u1,1\n0,nan,u2,2\n")
    code = cli.main(["train", "--config", str(tmp_path / "c.toml"), "--train.progress=false",
                     f"--data.train_files=['{tmp_path / 'train.csv'}']",
                     f"--data.eval_files=['{tmp_path / 'eval.csv'}']",
                     f"--train.run_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "eval.csv" in err and "data row 2" in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_json_files_are_strict_json(tmp_path) -> None:
    from mlet_dist.utils.files import atomic_write_json

    def strict(text):
        def refuse(token):
            raise ValueError(f"non-standard JSON token {token}")

        return json.loads(text, parse_constant=refuse)

    obj = {"auc": float("nan"), "ne": float("inf"), "rows": 3, "b": [{"x": -float("inf")}, 0.5]}
    atomic_write_json(tmp_path / "m.json", obj)
    assert strict((tmp_path / "m.json").read_text()) == {
        "auc": None, "ne": None, "rows": 3, "b": [{"x": None}, 0.5]
    }  # fmt: skip
    root = tmp_path / "served"
    root.mkdir()
    write_manifest(root, {"source": {"config": {"optim": {"eps": float("nan")}}}})
    assert strict((root / MANIFEST).read_text())["source"]["config"]["optim"]["eps"] is None


@pytest.mark.parametrize(
    "grid",
    [
        "grid = {'optim.embedding_lr' = [0.1, -1.0]}",
        "grid = {'train.log_every' = [0]}",
        "set = {'train.epochs' = 0}",
        "set = {'model.dense_arch_layer_sizes' = [-3, 8]}",
    ],
)
def test_a_value_the_config_refuses_stops_the_sweep_before_any_run(grid, tmp_path, capsys) -> None:
    sweep = tmp_path / "s.toml"
    sweep.write_text(f"inner_dims = []\ndims = [4, 8]\ntune_dim = 8\n[[baseline]]\nname = 'a'\n{grid}\n")  # fmt: skip
    work = tmp_path / "w"
    code = cli.main(["sweep", "--sweep", str(sweep), "--work", str(work),
                     "--data.test_fraction=0.1", f"--data.dir={tmp_path / 'data'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "sweep recipe a" in err, err
    assert not work.exists() and not (tmp_path / "data").exists()  # nothing ran, nothing made


def test_a_sweep_without_a_test_split_is_refused_before_any_run(tmp_path, capsys) -> None:
    sweep = tmp_path / "s.toml"
    sweep.write_text("inner_dims = []\ndims = [8]\ntune_dim = 8\n[[baseline]]\nname = 'a'\n")
    code = cli.main(["sweep", "--sweep", str(sweep), "--work", str(tmp_path / "w"),
                     f"--data.dir={tmp_path / 'data'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "test_fraction" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("value", [str(2**63), str(2**64 - 1), "1.5", "abc"])
def test_a_csv_int_id_that_is_no_int64_is_one_line(columns_schema, tmp_path, value) -> None:
    (tmp_path / "i.csv").write_text(f"y,x,u,n\n1,1.0,a,{value}\n")
    with pytest.raises(ColumnError, match="ids = 'int' takes ids") as e:
        _read(columns_schema, tmp_path / "i.csv")
    assert "\n" not in str(e.value)
