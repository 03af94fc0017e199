"""What the benchmark and report tools share: where things are, the CIFAR-10 sources and
splits, cached profiles, scoring, formatting. Tools import this module, never each other.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mdafx import api, ir
from mdafx.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ArrayDataset,
    load_imagefolder,
    resolve_data_root,
    split_per_class,
)
from mdafx.evaluation import predict
from mdafx.profiling import Profile, model_fingerprint

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODELS = ("vgg", "resnet20")
FIVE_A = ("airplane", "automobile", "ship", "truck", "horse")
FIVE_B = ("bird", "cat", "deer", "dog", "frog")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
TASKS: tuple[tuple[str, ...], ...] = (
    ("cat", "dog"),
    ("airplane", "ship"),
    ("automobile", "truck"),
    FIVE_A,
    CIFAR10_CLASSES,
)
DEFAULT_PER_CLASS = 50      # 1% of CIFAR-10's 5000 training images per class (MDA §1.1)
DEFAULT_CALIB_FRAC = 0.1    # share of each class's training images held out for calibration
DEFAULT_SEED = 0
INPUT_SHAPE = (1, 3, 32, 32)



# --------------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """``$MDAFX_CACHE`` if set, else ``<repo>/.cache`` (as tools/train_sources.py)."""
    env = os.environ.get("MDAFX_CACHE")
    return Path(env).expanduser() if env else ROOT / ".cache"


def data_root(arg: str | None) -> Path:
    """``--data``, else ``$MDAFX_DATA``, else ``<repo>/../shared/data`` when it holds cifar10/."""
    root = resolve_data_root(arg)
    if root is None:
        fallback = ROOT.parent / "shared" / "data"
        root = fallback if (fallback / "cifar10").is_dir() else None
    if root is None or not (root / "cifar10").is_dir():
        raise SystemExit(f"no CIFAR-10 at {root}/cifar10: pass --data DIR or set MDAFX_DATA to "
                         "the folder that holds cifar10/")
    return root


def task_label(task: Sequence[str]) -> str:
    return "all ten" if tuple(task) == CIFAR10_CLASSES else "{" + ", ".join(task) + "}"


# ------------------------------------------------------------------------------------ sources


def load_sources(names: Sequence[str],
                 sources_dir: Path) -> dict[str, tuple[torch.nn.Module, dict]]:
    """``name -> (model in eval mode, its card)``: the model cached by train_sources.py in
    ``sources_dir`` if there is one, else the embedded source ``cifar10-<name>`` shipped in the
    package (the same recipe, float16 weights; ``mdafx.models.pretrained``).

    Exits with a message naming the command to run when a model is neither.
    """
    from mdafx.models import PRETRAINED, pretrained, pretrained_card

    def cached(n):
        return (sources_dir / f"{n}.pt").is_file() and (sources_dir / f"{n}.json").is_file()

    missing = [n for n in names if not cached(n) and f"cifar10-{n}" not in PRETRAINED]
    if missing:
        raise SystemExit(
            f"source model(s) {', '.join(missing)} not cached in {sources_dir}: train them first "
            f"with\n    python tools/train_sources.py --data <folder holding cifar10/> "
            f"--models {','.join(missing)} --threads 1\n"
            "(the .json appears when a model is done)")
    out = {}
    for name in names:
        if not cached(name):
            out[name] = (pretrained(f"cifar10-{name}"), pretrained_card(f"cifar10-{name}"))
            continue
        info = json.loads((sources_dir / f"{name}.json").read_text())
        arch = info["architecture"]
        module_name, factory_name = arch["factory"].rsplit(".", 1)
        factory = getattr(importlib.import_module(module_name), factory_name)
        model = factory(**arch["kwargs"])
        state = torch.load(sources_dir / f"{name}.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        out[name] = (model.eval(), info)
    return out


def split_train(labels: np.ndarray, calib_frac: float = DEFAULT_CALIB_FRAC,
                seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(selection indices, calibration indices): disjoint, stratified per class."""
    select, calib = split_per_class(labels, [1.0 - calib_frac, calib_frac], seed=seed)
    return select, calib


# ------------------------------------------------------------------------------- measurements


count_params = ir.count_params


def count_macs(module: torch.nn.Module, input_shape: Sequence[int] = INPUT_SHAPE) -> int:
    """MACs of one forward at the CIFAR input shape (mdafx.ir.count_macs)."""
    return ir.count_macs(module, input_shape)


def profile_path(profile_dir: Path, name: str, gm: torch.fx.GraphModule, per_class: int,
                 calib_frac: float, seed: int) -> Path:
    """Where the profile of ``gm`` for this sample selection lives (model fingerprint in the
    name, so a retrained model never picks up a stale profile)."""
    fingerprint, _ = model_fingerprint(gm)
    return profile_dir / (f"{name}-n{per_class}-calib{calib_frac:g}-seed{seed}-"
                          f"{fingerprint[:12]}.safetensors")


def get_profile(gm: torch.fx.GraphModule, train_ds: ArrayDataset, select_idx: np.ndarray,
                class_names: Sequence[str], per_class: int, *, path: Path | None = None,
                reuse: bool = False, batch_size: int = 256, progress: bool = False
                ) -> tuple[Profile, float, bool]:
    """(profile, seconds, loaded): load ``path`` if ``reuse`` and it exists, else profile ``gm``
    on ``select_idx`` of ``train_ds`` and save to ``path`` (when given)."""
    if reuse and path is not None and path.is_file():
        t0 = time.perf_counter()
        prof = Profile.load(path)
        prof.check_matches(gm)
        return prof, time.perf_counter() - t0, True
    t0 = time.perf_counter()
    prof = api.profile(gm, train_ds, list(class_names), per_class=per_class,
                       indices=select_idx.tolist(), batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.save(path)
    return prof, seconds, False


def component_accuracy(module: torch.nn.Module, test_ds: ArrayDataset, test_idx: np.ndarray,
                       classes: Sequence[int], batch_size: int = 500) -> float:
    """Accuracy of a component (logits of ``classes``, in that order) on ``test_idx``."""
    logits, labels = predict(module, test_ds.batches(batch_size, test_idx))
    position = {c: p for p, c in enumerate(classes)}
    target = torch.tensor([position[int(y)] for y in labels.tolist()])
    return float((logits.argmax(1) == target).float().mean())


def indices_of(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(list(classes))))


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"



def common_args(ap: argparse.ArgumentParser) -> None:
    """Flags both tools share (same defaults: the same data split and profiles)."""
    ap.add_argument("--data", help="folder containing cifar10/ (default: $MDAFX_DATA, "
                                   "else ../shared/data)")
    ap.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                    help="profiling samples per class (default %(default)s = 1%% of 5000)")
    ap.add_argument("--calib-frac", type=float, default=DEFAULT_CALIB_FRAC,
                    help="share of each class's training images held out for calibration; the "
                         "rest is the sample-selection pool (default %(default)s)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed")
    ap.add_argument("--threshold-scale", type=float, default=1.0,
                    help="multiply MDA's alpha/beta thresholds (conv 0.3/0.2, linear 0.4/0.3) "
                         "by this (default 1.0)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--batch-size", type=int, default=256, help="profiling batch size")


def load_cifar(root: Path) -> tuple:
    train = load_imagefolder(root / "cifar10" / "train")
    test = load_imagefolder(root / "cifar10" / "test")
    if train.class_names != test.class_names:
        raise SystemExit("train and test class folders differ")
    train_ds = ArrayDataset(train.images, train.labels, CIFAR10_MEAN, CIFAR10_STD,
                            class_names=train.class_names)
    test_ds = ArrayDataset(test.images, test.labels, CIFAR10_MEAN, CIFAR10_STD,
                           class_names=test.class_names)
    return train, train_ds, test_ds
