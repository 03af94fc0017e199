"""mdafx/profiling.py: sample selection (MDA §1.1) and the profile file."""
from __future__ import annotations

import json
import os
import struct
import zipfile

import pytest
import torch
import torch.fx
from torch import Tensor, nn

from mdafx.errors import FormatError, ProfileMismatchError
from mdafx.passes.contributions import densify
from mdafx.profiling import Profile, build_profile, default_per_class, select_confident_samples
from imagefolders import mixed_folder

NUM_CLASSES = 4


class SmallNet(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(width * 4, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x)).relu()
        x = self.pool(self.conv2(x) + x)
        return self.fc(x.flatten(1))


class PointwiseNet(nn.Module):
    """Every kind of layer: 3×3 conv (dense A), 1×1 convs of groups 1/2/depthwise and two
    Linears (factored A)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 6, 1)
        self.gpw = nn.Conv2d(6, 6, 1, groups=2)
        self.dw = nn.Conv2d(6, 12, 1, groups=6)
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.gpw(self.pw(self.stem(x).relu()).relu()).relu()
        x = self.dw(x).relu().mean((2, 3))
        return self.fc2(self.fc1(x).relu())


def make_batches(x: Tensor, y: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def logit_batches(logits: Tensor, labels: Tensor, order: list[int], batch: int
                  ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Batches of (x, y, idx) where the model is the identity, so x are the logits."""
    idx = torch.tensor(order)
    return [(logits[idx[i:i + batch]], labels[idx[i:i + batch]], idx[i:i + batch])
            for i in range(0, len(order), batch)]


def brute_force_top(logits: Tensor, labels: Tensor, k: int, c: int) -> list[int]:
    probs = logits.double().softmax(-1)
    members = [i for i in range(len(labels)) if labels[i] == c]
    return sorted(members, key=lambda i: (-probs[i, c].item(), i))[:k]


def test_select_confident_samples_top_k() -> None:
    # class 0: true-label probabilities ranked 3 > 0 > 4; class 1: 1 > 2 (sample 2 is
    # misclassified but still eligible); sample 5 ties with 3 (same logits) and loses on index
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [3.0, 1.0, 0.0],
                           [4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [4.0, 0.0, 0.0],
                           [0.0, 0.0, 9.0]])
    labels = torch.tensor([0, 1, 1, 0, 0, 0, 2])
    model = nn.Identity()
    orders = [(list(range(7)), 7), ([6, 5, 4, 3, 2, 1, 0], 2), ([4, 0, 5, 2, 3, 6, 1], 3)]
    for order, batch in orders:
        sel = select_confident_samples(model, logit_batches(logits, labels, order, batch), 3, 2,
                                       progress=False)
        assert sel.indices == {0: [3, 5], 1: [1, 2], 2: [6]}
        expected_lp = logits.double().log_softmax(-1)[[3, 5], 0].tolist()
        assert sel.log_probs[0] == pytest.approx(expected_lp, rel=1e-12)
    sel = select_confident_samples(model, logit_batches(logits, labels, list(range(7)), 4), 3,
                                   {0: 3, 2: 1}, progress=False)
    assert sel.indices == {0: [3, 5, 0], 1: [], 2: [6]}
    assert sel.all_indices() == [0, 3, 5, 6]


def test_select_confident_samples_random_matches_brute_force() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(200, 5) * 3, torch.randint(0, 5, (200,))
    logits[10:20] = logits[10]  # ties
    labels[10:20] = labels[10]
    order = torch.randperm(200).tolist()
    sel = select_confident_samples(nn.Identity(), logit_batches(logits, labels, order, 17), 5,
                                   [4, 1, 7, 0, 3], progress=False)
    for c, k in enumerate([4, 1, 7, 0, 3]):
        assert sel.indices[c] == brute_force_top(logits, labels, k, c)


@pytest.mark.parametrize("n,expected", [(0, 1), (49, 1), (50, 1), (149, 1), (150, 2),
                                        (250, 3), (1300, 13), (5000, 50)])
def test_default_per_class(n: int, expected: int) -> None:
    assert default_per_class(n) == expected


# ---------------------------------------------------------------------------------------------
# the profile file


def small_profile(seed: int = 0) -> tuple[torch.fx.GraphModule, Profile]:
    torch.manual_seed(seed)
    gm = torch.fx.symbolic_trace(SmallNet())
    x, y = torch.randn(6, 3, 6, 6), torch.tensor([0, 1, 1, 3, 0, 1])
    profile = build_profile(gm, make_batches(x, y, 4), NUM_CLASSES, ["a", "b", "c", "d"],
                            progress=False)
    return gm, profile


def test_profile_round_trip(tmp_path: os.PathLike[str]) -> None:
    gm, profile = small_profile()
    assert profile.samples_per_class == [2, 3, 0, 1]
    assert profile.layers == ["conv1", "conv2", "fc"]
    assert profile.weight_shapes == {"conv1": [6, 3, 3, 3], "conv2": [6, 3, 3, 3],
                                     "fc": [NUM_CLASSES, 24]}
    assert profile.groups == {"conv1": 1, "conv2": 2, "fc": 1}
    path = os.path.join(tmp_path, "p.safetensors")
    profile.save(path)
    assert os.listdir(tmp_path) == ["p.safetensors"]  # no temporary file left behind
    loaded = Profile.load(path)
    for key in ("layers", "class_names", "samples_per_class", "weight_shapes", "groups",
                "fingerprint", "layer_digests"):
        assert getattr(loaded, key) == getattr(profile, key), key
    assert loaded.contributions.keys() == profile.contributions.keys()
    for name, a in profile.contributions.items():
        assert type(loaded.contributions[name]) is type(a)
        assert torch.equal(densify(loaded.contributions[name]), densify(a))
    loaded.check_matches(gm)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:  # a plain safetensors file, readable by any tool
        assert f.metadata()["format"] == "mdafx-profile"


def test_profile_mismatch_names_the_layer() -> None:
    gm, profile = small_profile()
    with torch.no_grad():
        gm.conv2.weight[0, 0, 0, 0] += 1.0
    with pytest.raises(ProfileMismatchError, match="'conv2'"):
        profile.check_matches(gm)
    other = torch.fx.symbolic_trace(SmallNet(width=8))
    with pytest.raises(ProfileMismatchError, match="'conv1': weight shape"):
        profile.check_matches(other)
    with pytest.raises(ProfileMismatchError, match="#0 is 'conv1' but the model has '0'"):
        profile.check_matches(torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 6, 3))))
    same_arch, _ = small_profile(seed=1)
    with pytest.raises(ProfileMismatchError, match="'conv1'"):
        profile.check_matches(same_arch)


def test_profile_load_rejects_other_files(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "x.pt")
    torch.save({"a": torch.zeros(1)}, path)  # the previous format was a torch.save zip
    with pytest.raises(FormatError, match="previous format.*mdafx analyse"):
        Profile.load(path)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, path)
    with pytest.raises(FormatError, match="not an mdafx profile"):
        Profile.load(path)


def test_profile_round_trip_factored(tmp_path: os.PathLike[str]) -> None:
    torch.manual_seed(3)
    gm = torch.fx.symbolic_trace(PointwiseNet())
    x, y = torch.randn(10, 3, 5, 5), torch.arange(10) % NUM_CLASSES
    profile = build_profile(gm, make_batches(x, y, 4), NUM_CLASSES, progress=False)
    kinds = {k: type(v).__name__ for k, v in profile.contributions.items()}
    assert kinds == {"stem": "Tensor", "pw": "FactoredContribution",
                     "gpw": "FactoredContribution", "dw": "FactoredContribution",
                     "fc1": "FactoredContribution", "fc2": "FactoredContribution"}
    path = os.path.join(tmp_path, "p.safetensors")
    profile.save(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert {"pw.pos", "pw.neg", "pw.weight", "stem"} <= set(f.keys())
    for _ in range(2):
        loaded = Profile.load(path)
        loaded.check_matches(gm)
        for name, a in profile.contributions.items():
            b = loaded.contributions[name]
            assert type(b) is type(a) and b.shape == a.shape
            assert torch.equal(densify(b), densify(a)), name
        assert loaded.contributions["gpw"].groups == 2 and loaded.contributions["dw"].groups == 6
    dense = build_profile(gm, make_batches(x, y, 4), NUM_CLASSES, progress=False, dense=True)
    for name, a in profile.contributions.items():
        assert torch.equal(dense.contributions[name], densify(a)), name




def _rewrite_header(path: str, edit) -> None:
    """Load the safetensors header of ``path``, apply ``edit`` to the profile JSON, write back."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        rest = f.read()
    prof = json.loads(header["__metadata__"]["profile"])
    edit(prof)
    header["__metadata__"]["profile"] = json.dumps(prof)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + rest)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"].append("ghost"), "ghost"),
    (lambda p: p.__setitem__("class_names", ["a", "a", "c", "d"]), "distinct"),
    (lambda p: p["class_names"].pop(), "expected|does not fit"),
    (lambda p: p.__setitem__("version", 99), "version 99"),
    (lambda p: p["kinds"]["conv1"].__setitem__("kind", "pickle"), "unknown kind"),
])
def test_profile_load_refuses_inconsistent_files(tmp_path, edit, message) -> None:
    _, profile = small_profile()
    path = os.path.join(tmp_path, "p.safetensors")
    profile.save(path)
    _rewrite_header(path, edit)
    with pytest.raises(FormatError, match=message):
        Profile.load(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_profile_load_refuses_non_finite_or_negative_contributions(tmp_path, value) -> None:
    _, profile = small_profile()
    profile.contributions["conv1"][0, 0, 0] = value
    path = os.path.join(tmp_path, "p.safetensors")
    profile.save(path)
    with pytest.raises(FormatError, match="'conv1'"):
        Profile.load(path)


def test_profile_load_refuses_truncated_files(tmp_path) -> None:
    _, profile = small_profile()
    path = os.path.join(tmp_path, "p.safetensors")
    profile.save(path)
    data = open(path, "rb").read()
    for cut in (0, 4, 9, len(data) // 2, len(data) - 1):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(FormatError, match="p.safetensors"):
            Profile.load(path)


# ---------------------------------------------------------------------------------------------
# folders of any size, devices, autocast, progress, exact merging


def _tiny(num_classes: int = 3, size: int = 16) -> torch.fx.GraphModule:
    from mdafx.api import trace
    from mdafx.models import tiny_cnn

    torch.manual_seed(0)
    return trace(tiny_cnn(num_classes), torch.zeros(1, 3, size, size))


def test_mixed_size_folder_profiles_and_disassembles_streamed(tmp_path, monkeypatch) -> None:
    from mdafx import api, data

    root = mixed_folder(tmp_path / "mixed")
    fmt = data.InputFormat((16, 16), 3, (0.5,) * 3, (0.25,) * 3)

    def never(*a, **k):
        raise AssertionError("the folder was decoded whole")

    monkeypatch.setattr(data, "load_imagefolder", never)
    monkeypatch.setattr(data, "_decode", never)
    reads = []
    getitem = data.ImageFolderStream.__getitem__
    monkeypatch.setattr(data.ImageFolderStream, "__getitem__",
                        lambda self, i: reads.append(i) or getitem(self, i))
    gm = _tiny()
    prof = api.analyse(gm, root, fmt, per_class=2, holdout=0.2, batch_size=8,
                       transform=data.Preprocess(20, 16), workers=0, device="cpu")
    assert prof.record["preprocess"] == {"resize": 20, "crop": [16, 16],
                                         "interpolation": "bilinear"}
    assert prof.record["calibration"]["digest"] == "files"
    held = prof.record["calibration"]["indices"]
    # every profiling image read once to select, the selected ones once more
    assert len(reads) == 30 - len(held) + sum(prof.samples_per_class) == 24 + 6
    assert not set(reads[:24]) & set(held)
    comp = api.cut(gm, prof, ["bee", "ant"])
    assert comp.class_names == ["bee", "ant"]
    ds, idx, text = api.calibration_split(prof)  # read back with the recorded preprocessing
    assert isinstance(ds, data.ImageFolderStream) and idx == held and "held out" in text
    report = api.evaluate(comp.module, ds, comp.class_names)
    assert report.images == 20 and report.rows[-1][1] == 20
    # rewriting a held-out image is seen without decoding any
    from PIL import Image

    Image.new("RGB", (30, 30)).save(ds.path(held[0]))
    import os

    st = os.stat(ds.path(held[0]))
    os.utime(ds.path(held[0]), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(data.DataError, match="changed since the profile was computed"):
        api.calibration_split(prof)


def test_profile_on_cpu_device_equals_the_default_and_moves_nothing() -> None:
    from mdafx.data import ArrayDataset
    from mdafx.profiling import profile

    gm = _tiny(4)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (40, 16, 16, 3), generator=g, dtype=torch.uint8).numpy()
    ds = ArrayDataset(imgs, (torch.arange(40) % 4).numpy(), mean=(0.5,) * 3, std=(0.25,) * 3)
    a = profile(gm, ds, per_class=3, batch_size=16, progress=False)
    b = profile(gm, ds, per_class=3, batch_size=16, progress=False, device=torch.device("cpu"))
    assert a.selected == b.selected and all(
        torch.equal(densify(a.contributions[n]), densify(b.contributions[n])) for n in a.layers)
    # autocast (bfloat16 on CPU) only changes the selection's forward passes
    c = profile(gm, ds, per_class=3, batch_size=16, progress=False, use_autocast=True)
    assert c.samples_per_class == a.samples_per_class
    assert next(gm.parameters()).device.type == "cpu"


def test_merged_shard_selections_equal_one_selection() -> None:
    from mdafx.distributed import Ranks
    from mdafx.profiling import merge_confident_samples

    torch.manual_seed(4)
    logits, labels = torch.randn(90, 4) * 2, torch.randint(0, 4, (90,))
    logits[30:45] = logits[30]  # ties across shards
    labels[30:45] = labels[30]
    quota = [5, 2, 9, 1]
    whole = select_confident_samples(nn.Identity(), logit_batches(logits, labels,
                                                                  list(range(90)), 8),
                                     4, quota, progress=False)
    parts = []
    for r in range(3):
        shard = Ranks(r, 3).shard(list(range(90)), 8)
        parts.append(select_confident_samples(nn.Identity(),
                                               logit_batches(logits, labels, shard, 8), 4,
                                               quota, progress=False))
    merged = merge_confident_samples(parts, quota, 4)
    assert merged.indices == whole.indices and merged.log_probs == whole.log_probs


def test_progress_prints_status_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys) -> None:
    from mdafx import progress

    monkeypatch.setattr(progress, "STATUS_INTERVAL", 0.0)
    logits, labels = torch.randn(20, 3), torch.arange(20) % 3
    select_confident_samples(nn.Identity(), logit_batches(logits, labels, list(range(20)), 5),
                             3, 1, total=4)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("select samples: 1/4 batches, 25%, ETA ")
    assert lines[-1].startswith("select samples: 4/4 batches, 100%") and "done" in lines[-1]
    select_confident_samples(nn.Identity(), logit_batches(logits, labels, list(range(20)), 5),
                             3, 1, progress=False)
    assert capsys.readouterr().err == ""
