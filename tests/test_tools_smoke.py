"""Smoke test of tools/reproduce.py and tools/bench_assembly.py on tiny untrained models and a
small CIFAR-10 subset: the tables have the expected rows and columns, the numbers are in range.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_assembly as ba  # noqa: E402
import report_accuracy as ra  # noqa: E402
import common  # noqa: E402
import reproduce  # noqa: E402
from mdafx.data import ArrayDataset, load_imagefolder, split_per_class  # noqa: E402
from mdafx.models import resnet_cifar, vgg_cifar  # noqa: E402

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def cifar_subset(data_root):
    """40 selection + 10 calibration training images and 20 test images per class."""
    train = load_imagefolder(data_root / "cifar10" / "train")
    test = load_imagefolder(data_root / "cifar10" / "test")
    sel, cal = split_per_class(train.labels, [40, 10], seed=0)
    sub = np.concatenate([sel, cal])
    train_ds = ArrayDataset(train.images[sub], train.labels[sub])
    (test_sub,) = split_per_class(test.labels, [20], seed=0)
    test_ds = ArrayDataset(test.images[test_sub], test.labels[test_sub])
    # positions inside the subset: the first len(sel) are the selection part
    return train_ds, np.arange(len(sel)), np.arange(len(sel), len(sub)), test_ds, \
        train.class_names


@pytest.fixture(scope="module")
def sources():
    torch.manual_seed(0)
    return {"vgg_t": vgg_cifar(width=0.25).eval(),
            "res_t": resnet_cifar(depth=8, width=4).eval()}


def _in_unit(x):
    return 0.0 <= x <= 1.0


def test_reproduce_tables(cifar_subset, sources, tmp_path):
    train_ds, sel, _, test_ds, names = cifar_subset
    reports = []
    for name, model in sources.items():
        path = tmp_path / f"{name}.pt"
        rep = reproduce.reproduce_model(name, model, train_ds, sel, test_ds, names, per_class=3,
                                 profile_file=path, batch_size=128)
        assert path.is_file() and not rep.profile_loaded
        assert rep.samples_per_class == [3] * 10
        assert [r["task"] for r in rep.rows] == [
            "{cat, dog}", "{airplane, ship}", "{automobile, truck}",
            "{airplane, automobile, ship, truck, horse}", "all ten"]
        assert [r["n_test"] for r in rep.rows] == [40, 40, 40, 100, 200]
        for r in rep.rows:
            assert _in_unit(r["source_acc"]) and _in_unit(r["component_acc"])
            assert r["delta"] == pytest.approx(r["component_acc"] - r["source_acc"])
            assert 0 < r["params_rel"] <= 1 and 0 < r["macs_rel"] <= 1
            assert 0 < r["channels_kept"] <= r["channels_total"]
        # the component of all ten classes keeps at least as much as any smaller task
        assert rep.rows[-1]["params"] >= max(r["params"] for r in rep.rows[:3])
        reports.append(rep)
    again = reproduce.reproduce_model("res_t", sources["res_t"], train_ds, sel, test_ds, names,
                               tasks=[("cat", "dog")], per_class=3,
                               profile_file=tmp_path / "res_t.pt", reuse_profile=True)
    assert again.profile_loaded
    assert again.rows[0]["component_acc"] == reports[1].rows[0]["component_acc"]

    text = reproduce.format_report(reports)
    md = reproduce.format_report(reports, tablefmt="github", title_prefix="## ")
    for header in reproduce.HEADERS:
        assert header in text and header in md
    assert text.count("all ten") == 2 and md.count("## ") == 2
    assert "profile (computed)" in text


def test_load_sources(tmp_path, sources):
    with pytest.raises(SystemExit, match="tools/train_sources.py"):
        common.load_sources(["vgg16"], tmp_path)
    embedded, card = common.load_sources(["vgg"], tmp_path)["vgg"]  # not cached: the package's
    assert card["name"] == "cifar10-vgg" and type(embedded).__name__ == "VGGCifar"
    model = sources["res_t"]
    torch.save(model.state_dict(), tmp_path / "res_t.pt")
    info = {"architecture": {"factory": "mdafx.models.resnet_cifar",
                             "kwargs": {"depth": 8, "width": 4}}}
    (tmp_path / "res_t.json").write_text(json.dumps(info))
    loaded, got_info = common.load_sources(["res_t"], tmp_path)["res_t"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert got_info == info


def test_bench_assembly_table(cifar_subset, sources, tmp_path):
    train_ds, sel, cal, test_ds, names = cifar_subset
    specs = ba.default_specs("vgg_t", "res_t")
    report = ba.bench_assembly(sources, train_ds, sel, cal, test_ds, names, specs,
                               per_class=3, profile_dir=tmp_path / "profiles",
                               latency=True, latency_specs=[0], onnx_dir=tmp_path / "onnx",
                               latency_iters=2, batch_size=128)
    assert [(r["label"], r["layout"]) for r in report.rows] == [
        ("vgg_t{cat, dog} + res_t{airplane, ship}", "parallel"),
        ("vgg_t{airplane, automobile, ship, truck, horse} + "
         "res_t{bird, cat, deer, dog, frog}", "parallel"),
        ("vgg_t{cat, dog} + vgg_t{airplane, ship}", "merged"),
        ("vgg_t{cat, dog} + vgg_t{airplane, ship}", "parallel"),
        ("res_t{cat, dog} + res_t{airplane, ship}", "merged"),
        ("res_t{cat, dog} + res_t{airplane, ship}", "parallel"),
    ]
    assert [r["n_test"] for r in report.rows] == [80, 200, 80, 80, 80, 80]
    assert report.rows[1]["classes"] == list(common.FIVE_A + common.FIVE_B)
    for r in report.rows:
        for key in ("baseline", "components", "assembled", "scaled"):
            assert _in_unit(r[key]), (key, r)
        assert 0 < r["params_nonzero"] <= r["params"] and r["macs"] > 0
    # same components, same outputs: merged and parallel layouts score the same
    for merged, parallel in ((2, 3), (4, 5)):
        a, b = report.rows[merged], report.rows[parallel]
        # (up to one image flipped by float rounding at a near-tie)
        assert (a["assembled"], a["scaled"]) == pytest.approx((b["assembled"], b["scaled"]),
                                                              abs=1.01 / a["n_test"])
        assert a["params_nonzero"] == b["params_nonzero"]  # padding kernels are zeros
        assert b["params"] < a["params"]
    lat = report.rows[0]["latency_ms"]
    assert lat is not None and lat[0] > 0 and lat[1] > 0
    assert all(r["latency_ms"] is None for r in report.rows[1:])
    assert (tmp_path / "onnx").is_dir() and len(list((tmp_path / "onnx").glob("*.onnx"))) == 3
    for info in report.parts.values():
        assert bool(torch.isfinite(info.scales).all()) and bool((info.scales > 0).all())

    text = ba.format_report(report)
    md = ba.format_report(report, "github")
    for header in ba.HEADERS:
        assert header in text and header in md
    assert "nonzero" in text and text.count("merged") == 2


def test_report_accuracy_rows(cifar_subset, sources, monkeypatch, tmp_path):
    """tools/report_accuracy.py on a tiny untrained source: one row per recipe, in range, the
    goal column consistent with the numbers, the diagnosis rows cover every weighted layer."""
    train_ds, sel, cal, test_ds, names = cifar_subset
    monkeypatch.setenv("MDAFX_CACHE", str(tmp_path))

    class Split:  # the subset's own selection/calibration split instead of CIFAR's 90/10
        labels = train_ds.labels.numpy()
        class_names = names

    monkeypatch.setattr(common, "split_train", lambda labels, frac, seed: (sel, cal))
    src = ra.Source("res_t", sources["res_t"], Split, train_ds, test_ds, seed=0, per_class=3)
    rows, _ = ra.recipe_rows(src, [("cat", "dog")], list(ra.RECIPE_ORDER), lambda _: None)
    assert [r["recipe"] for r in rows] == list(ra.RECIPE_ORDER)
    for r in rows:
        assert _in_unit(r["acc"]) and _in_unit(r["source"]) and 0 < r["macs"] <= 1
        assert r["delta"] == pytest.approx(100 * (r["acc"] - r["source"]))
        assert r["goal"] == (r["delta"] >= -1.0 - 1e-7 and r["macs"] <= 0.5 + 1e-9)
    assert rows[-1]["cost"] > 0 and rows[-1]["scored"] >= 1       # assemblable searches
    gamma = {r["recipe"]: r["gamma"] for r in rows}               # the γ each component used
    assert gamma["mda"] == gamma["searched+reconstruct"] == 0.0 and gamma["cost-aware"] == 0.5
    assert gamma["default"] in (0.0, 0.5) and gamma["reference"] == 0.0
    assert "{cat, dog}" in ra.recipe_table(rows)
    weighted = [n for n in src.gm.graph.nodes if n.op == "call_module" and isinstance(
        src.gm.get_submodule(n.target), (torch.nn.Conv2d, torch.nn.Linear))]
    diag = ra.diagnosis_table(src, ("cat", "dog")).splitlines()
    assert len(diag) == 2 + len(weighted)                         # header, rule, one per layer
    assert [line.split("|")[1].strip() for line in diag[2:]] == [n.name for n in weighted]


def test_report_accuracy_assembly_rows(cifar_subset, sources, monkeypatch, tmp_path):
    """The assembly table: four calibrations per recipe and per assembly, plus the same rows
    for components cut at zero thresholds (CEILING) and for the whole sources (WHOLE), each
    keeping at least as many params as the one before."""
    train_ds, sel, cal, test_ds, names = cifar_subset
    monkeypatch.setenv("MDAFX_CACHE", str(tmp_path))

    class Split:
        labels = train_ds.labels.numpy()
        class_names = names

    monkeypatch.setattr(common, "split_train", lambda labels, frac, seed: (sel, cal))
    monkeypatch.setattr(ra, "ASSEMBLY_RECIPES", ("mda",))
    monkeypatch.setattr(ra, "ASSEMBLIES", ((("vgg_t", ("cat", "dog")),
                                            ("res_t", ("airplane", "ship"))),))
    srcs = {n: ra.Source(n, m, Split, train_ds, test_ds, seed=0, per_class=3)
            for n, m in sources.items()}
    made = {(n, tuple(t), "mda"): ra.make(srcs[n], t, "mda")[0]
            for n, t in ra.ASSEMBLIES[0]}
    rows = ra.assembly_rows(srcs, made, lambda _: None)
    assert [(r[2], r[3]) for r in rows] == [
        (recipe, variant) for recipe in ("mda", ra.CEILING, ra.WHOLE)
        for variant in ("none", "MDA scaling", "joint", "head")]
    assert all(r[1] == 4 and _in_unit(float(r[4].rstrip("%")) / 100) for r in rows)
    params = [int(r[9].replace(",", "")) for r in rows]
    assert min(params[4:]) >= max(params[:4]) and min(params[8:]) >= max(params[4:8])


@pytest.mark.parametrize("flag", ["--recipes", "--assembly-recipes", "--seed-recipe"])
def test_report_accuracy_refuses_unknown_recipes(flag, capsys):
    """A misspelt recipe is a usage error naming it, before any source is loaded or trained."""
    with pytest.raises(SystemExit) as exc:
        ra.main([flag, "defualt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown recipe(s) defualt" in err and "mda-channels" in err
