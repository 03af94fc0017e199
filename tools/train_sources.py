"""Train the CIFAR-10 source models that the MDA benchmarks disassemble, and cache them.

    python tools/train_sources.py --data /work/shared/data [--models vgg,resnet20] [--force]

Each model is written as ``<out>/<name>.pt`` (a plain state_dict: ``torch.load(path,
weights_only=True)``) and ``<out>/<name>.json`` (its recipe and test scores); ``<out>`` defaults
to ``$MDAFX_CACHE/sources`` or ``<repo>/.cache/sources``. Models already cached are skipped
unless ``--force``. Files are written atomically, so an interrupted run never leaves a model
that looks cached.

The recipes are sized for one CPU thread: each model costs 8 epochs of ~140 s of CPU time
(measured on one Zen 4 core, batch 128, channels-last, float32), i.e. about 19 minutes; wall
time is longer when other processes share the core, so the .json records both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mdafx.data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    ArrayDataset,
    load_imagefolder,
    resolve_data_root,
)
from mdafx.models import resnet_cifar, tiny_cnn, vgg_cifar  # noqa: E402
from mdafx.evaluation import confusion_report as evaluate
from mdafx.training import train_classifier  # noqa: E402

# name -> (factory, factory kwargs, training recipe). Shared choices and why:
# - one-cycle SGD+Nesterov at lr 0.2, batch 128: the most accuracy per epoch on short schedules;
# - translate +-2 px + flip: light augmentation suits a few epochs (the models underfit);
# - label smoothing 0.1: a small gain on short schedules, logits stay well-scaled.
_COMMON = dict(lr=0.2, batch_size=128, weight_decay=5e-4, label_smoothing=0.1, momentum=0.9,
               warmup_frac=0.15, pad=2, flip=True, seed=0, channels_last=True)
RECIPES: dict[str, tuple] = {
    "vgg": (vgg_cifar, {"num_classes": 10, "width": 1.0}, {**_COMMON, "epochs": 8}),
    "resnet20": (resnet_cifar, {"depth": 20, "num_classes": 10, "width": 16},
                 {**_COMMON, "epochs": 8}),
    "tiny": (tiny_cnn, {"num_classes": 10}, {**_COMMON, "epochs": 4}),
}
DEFAULT_MODELS = ("vgg", "resnet20")


def _default_out() -> Path:
    env = os.environ.get("MDAFX_CACHE")
    base = Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / ".cache"
    return base / "sources"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_one(name: str, train, test, out: Path, threads: int, epochs: int | None,
              subset: int | None) -> dict:
    factory, kwargs, recipe = RECIPES[name]
    recipe = dict(recipe)
    if epochs is not None:
        recipe["epochs"] = epochs
    torch.manual_seed(recipe["seed"])
    model = factory(**kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    ds = ArrayDataset(train.images, train.labels, CIFAR10_MEAN, CIFAR10_STD, augment=True,
                      pad=recipe["pad"])
    indices = None if subset is None else torch.randperm(
        len(ds), generator=torch.Generator().manual_seed(recipe["seed"]))[:subset].numpy()
    epoch_log = []

    def on_epoch_end(epoch, stats):
        epoch_log.append({k: round(v, 4) for k, v in stats.items()})
        print(f"[{name}] epoch {epoch + 1}/{recipe['epochs']}: loss {stats['loss']:.4f} "
              f"train acc {stats['train_acc']:.4f} ({stats['seconds']:.0f} s wall, "
              f"{stats['cpu_seconds']:.0f} s CPU)", flush=True)

    print(f"[{name}] {n_params:,} params, recipe {recipe}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    model = train_classifier(
        model, ds, epochs=recipe["epochs"], lr=recipe["lr"], batch_size=recipe["batch_size"],
        weight_decay=recipe["weight_decay"], seed=recipe["seed"], progress=True,
        label_smoothing=recipe["label_smoothing"], momentum=recipe["momentum"],
        warmup_frac=recipe["warmup_frac"], channels_last=recipe["channels_last"],
        indices=indices, on_epoch_end=on_epoch_end,
    )
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    test_ds = ArrayDataset(test.images, test.labels, CIFAR10_MEAN, CIFAR10_STD)
    acc, per_class, _ = evaluate(model, test_ds.batches(500), num_classes=len(test.class_names))
    print(f"[{name}] test accuracy {acc:.4f} after {train_s:.0f} s wall, {train_cpu_s:.0f} s CPU",
          flush=True)

    info = {
        "name": name,
        "architecture": {"factory": f"mdafx.models.{factory.__name__}", "kwargs": kwargs},
        "params": n_params,
        "dataset": "cifar10",
        "classes": list(train.class_names),
        "train_samples": len(ds) if indices is None else len(indices),
        "normalize": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
        "epochs": recipe["epochs"],
        "lr": recipe["lr"],
        "batch_size": recipe["batch_size"],
        "weight_decay": recipe["weight_decay"],
        "optimizer": f"SGD(momentum={recipe['momentum']}, nesterov=True), no decay on BN/bias",
        "schedule": f"one-cycle: linear warm-up {recipe['warmup_frac']:.0%} from lr/10, "
                    "cosine to lr/1e4",
        "label_smoothing": recipe["label_smoothing"],
        "augmentation": {"random_crop_pad": recipe["pad"], "horizontal_flip": recipe["flip"]},
        "seed": recipe["seed"],
        "channels_last": recipe["channels_last"],
        "dtype": "float32",
        "threads": threads,
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "epoch_log": epoch_log,
        "test_accuracy": round(acc, 4),
        "per_class_test_accuracy": {c: round(float(a), 4)
                                    for c, a in zip(test.class_names, per_class)},
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out / f"{name}.pt", lambda f: torch.save(state, f))
    # The .json goes last: its presence marks the model as cached.
    _atomic_write(out / f"{name}.json",
                  lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="folder containing cifar10/ (default: $MDAFX_DATA)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated, from {', '.join(RECIPES)} (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="retrain models already cached")
    ap.add_argument("--out", type=Path, default=None,
                    help="cache folder (default: $MDAFX_CACHE/sources or <repo>/.cache/sources)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="train on this many random samples (smoke tests only)")
    args = ap.parse_args(argv)

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in RECIPES]
    if unknown or not names:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(RECIPES)}")
    root = resolve_data_root(args.data)
    if root is None:
        ap.error("no data root: pass --data DIR or set MDAFX_DATA (the folder holding cifar10/)")
    if not (root / "cifar10").is_dir():
        ap.error(f"{root / 'cifar10'} does not exist: --data/MDAFX_DATA must hold cifar10/")
    out = args.out or _default_out()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    todo = [m for m in names
            if args.force or not ((out / f"{m}.pt").is_file() and (out / f"{m}.json").is_file())]
    train = test = None
    if todo:
        train = load_imagefolder(root / "cifar10" / "train")
        test = load_imagefolder(root / "cifar10" / "test")
    rows = []
    for name in names:
        if name in todo:
            info = train_one(name, train, test, out, args.threads, args.epochs,
                             args.train_subset)
            status = "trained"
        else:
            info = json.loads((out / f"{name}.json").read_text())
            status = "cached"
        cpu = info.get("train_cpu_seconds")
        rows.append([name, f"{info['params']:,}", info["epochs"],
                     f"{info['train_seconds'] / 60:.1f} min",
                     "-" if cpu is None else f"{cpu / 60:.1f} min",
                     f"{info['test_accuracy']:.2%}", status])
    print(tabulate(rows, headers=["model", "params", "epochs", "train time", "CPU time",
                                  "test acc", ""]))
    print(f"cached in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
