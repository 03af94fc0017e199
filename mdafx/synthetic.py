"""The demo (``mdafx demo``): the whole pipeline, on synthetic images or on CIFAR-10 images.

Without data (:func:`demo`): ten synthetic classes (bars, diagonals, outlines, disk, ring, plus,
cross, triangle) at 16x16; two small sources of different architectures and input
normalisations are trained, a task is disassembled from each, the components are assembled
(without calibration, with MDA §2.1's scaling, with joint logit calibration, and with a feature
head: the last is kept) on a calibration split, exported to ONNX, and every model is scored on a
test split.

With ``data`` (:func:`demo_pretrained`): the two embedded CIFAR-10 sources
(``mdafx.models.pretrained``: a VGG and a ResNet-20, no training), on a scaled-down copy of the
user's CIFAR-10 ImageFolder: each is analysed on ``train_per_class`` training images per class
(a tenth held out for calibration), one task is cut from each with the default recipe, the two
components are assembled with a feature head fitted on the calibration images, exported to
ONNX, and scored on
``test_per_class`` test images per class.
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import artifacts
from .assembly import assemble, fit_calibration
from .data import ArrayDataset, ImageArrays, InputFormat, batches
from .errors import DataError
from .deployment import export_onnx, onnxruntime_logits
from .disassembly import cut
from .evaluation import accuracy, matched_indices, predict, task_accuracy
from .fileio import atomic_output
from .ir import count_params, trace
from .models import resnet_cifar, tiny_cnn
from .profiling import profile
from .training import train_classifier

__all__ = ["DEMO_CLASSES", "DEMO_TASKS", "PRETRAINED_TASKS", "DemoReport", "demo",
           "demo_pretrained", "subset_imagefolder", "synthetic_shapes"]

DEMO_CLASSES = ("hbar", "vbar", "diag", "anti", "square", "disk", "ring", "plus", "cross", "tri")
DEMO_TASKS = (("disk", "ring", "square"), ("plus", "cross", "tri"))
DEMO_SIZE = 16
PRETRAINED_TASKS = (("cifar10-vgg", ("automobile", "truck")),
                    ("cifar10-resnet20", ("cat", "dog")))
"""What the data demo cuts: a task from each embedded source (two architectures)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")


def synthetic_shapes(per_class: int, size: int = DEMO_SIZE, seed: int = 0):
    """``(images uint8 [N, size, size, 3], labels int64 [N])``: one shape per class of
    :data:`DEMO_CLASSES` (bars, diagonals, outlines, disk, ring, plus, cross, triangle) at a
    random position, size and colour on a random dark background, with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    k = len(DEMO_CLASSES)
    n = per_class * k
    labels = torch.arange(k).repeat_interleave(per_class)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def jitter(scale):
        return (torch.rand(n, 1, 1, generator=g) - 0.5) * scale

    dx = xx - (size / 2 + jitter(size * 0.3))
    dy = yy - (size / 2 + jitter(size * 0.3))
    r = size * (0.22 + 0.12 * torch.rand(n, 1, 1, generator=g))
    ax, ay = dx.abs(), dy.abs()
    box, rad, w, d = torch.maximum(ax, ay), (dx * dx + dy * dy).sqrt(), 0.9, 1.3
    diag, anti = (dx - dy).abs() <= d, (dx + dy).abs() <= d
    shapes = torch.stack([
        (ay <= w) & (ax <= r), (ax <= w) & (ay <= r), diag & (box <= r), anti & (box <= r),
        (box <= r) & (box >= r - 1.6), rad <= r, (rad <= r) & (rad >= r - 1.6),
        ((ax <= w) | (ay <= w)) & (box <= r), (diag | anti) & (box <= r),
        (ay <= r) & (ax <= (dy + r) / 2),
    ], 1)
    mask = shapes[torch.arange(n), labels].unsqueeze(1).float()
    fg = 0.45 + 0.55 * torch.rand(n, 3, 1, 1, generator=g)
    bg = 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    img = bg + (fg - bg) * mask + 0.12 * torch.randn(n, 3, size, size, generator=g)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return img.contiguous().numpy(), labels.numpy()


def _write_imagefolder(root: Path, images, labels) -> None:
    from PIL import Image

    for name in DEMO_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    counters = [0] * len(DEMO_CLASSES)
    for img, y in zip(images, labels.tolist()):
        Image.fromarray(img).save(root / DEMO_CLASSES[y] / f"{counters[y]:04d}.png")
        counters[y] += 1


def _demo_sources(pixel_mean, pixel_std):
    """The two source models: ``(--model spec, --model-arg pairs, factory, input format)``.
    Their input normalisations differ on purpose: the assembled model adapts its input per
    branch (MDA 2.2)."""
    size, k = (DEMO_SIZE, DEMO_SIZE), len(DEMO_CLASSES)
    return [
        ("tiny_cnn", [], lambda: tiny_cnn(k), InputFormat(size, 3, (0.5,) * 3, (0.25,) * 3)),
        ("resnet_cifar", [["depth", 8], ["width", 8]], lambda: resnet_cifar(8, k, width=8),
         InputFormat(size, 3, tuple(pixel_mean), tuple(pixel_std))),
    ]


@dataclass
class DemoReport:
    out: Path
    rows: list[list]
    onnx: str
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _dataset(split: ImageArrays, fmt: InputFormat) -> ArrayDataset:
    return ArrayDataset(split.images, split.labels, mean=fmt.mean, std=fmt.std,
                        class_names=split.class_names)


def _matched(dataset, names) -> tuple[list[int], list[int]]:
    index, positions, _ = matched_indices(dataset, names)
    return index, positions


def demo(out: str | os.PathLike | None = None, *, seed: int = 0, epochs: int = 4,
         train_per_class: int = 150, images: bool = True, progress: bool = False,
         data: str | os.PathLike | None = None, test_per_class: int = 100) -> DemoReport:
    """Run the demo into ``out`` (default: a new temporary folder); see the module docstring.
    With ``data`` it is :func:`demo_pretrained` (``epochs`` and ``images`` do not apply)."""
    from tqdm.auto import tqdm

    if data is not None:
        return demo_pretrained(data, out, train_per_class=train_per_class,
                               test_per_class=test_per_class, seed=seed, progress=progress)

    started = time.perf_counter()
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="mdafx-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    splits = {name: ImageArrays(*synthetic_shapes(n, seed=seed + i), list(DEMO_CLASSES))
              for i, (name, n) in enumerate((("train", train_per_class),
                                             ("calib", max(10, train_per_class // 3)),
                                             ("test", 100)))}
    if images:
        for name, split in splits.items():
            _write_imagefolder(out / "data" / name, split.images, split.labels)
    pixels = splits["train"].images.reshape(-1, 3) / 255.0
    sources, components = [], []
    bar = tqdm(total=3 * len(DEMO_TASKS), desc="demo", disable=not progress)
    for k, ((spec, model_args, factory, fmt), task) in enumerate(
            zip(_demo_sources(pixels.mean(0).tolist(), pixels.std(0).tolist()), DEMO_TASKS)):
        name = f"source{k}_{spec}"
        bar.set_description(f"train {name}")
        torch.manual_seed(seed + k)
        model, train_ds, t0 = factory(), _dataset(splits["train"], fmt), time.perf_counter()
        train_classifier(model, train_ds, epochs=epochs, lr=0.05, batch_size=32,
                         weight_decay=5e-4, seed=seed + k, progress=False)
        sources.append((name, model, fmt, time.perf_counter() - t0))
        with atomic_output(out / f"{name}.pt", overwrite=True) as tmp:
            torch.save(model.state_dict(), tmp)
        bar.update()
        bar.set_description(f"profile {name}")
        gm = trace(model, fmt.example())
        prof = profile(gm, train_ds, list(DEMO_CLASSES), progress=False)
        prof.record = {"source": {"model": spec, "model_args": model_args}, "input": fmt.to_dict()}
        prof.save(out / f"{name}.profile.safetensors", overwrite=True)
        bar.update()
        bar.set_description(f"disassemble {name}")
        comp = cut(gm, prof, list(task), source=name)
        comp.metadata["input"] = fmt.to_dict()
        path = out / f"component{k}_{'-'.join(task)}.mdafx"
        artifacts.save(comp, path, overwrite=True)
        components.append(artifacts.load_component(path))  # from the file, as assemble does
        bar.update()
    bar.close()

    calib = _dataset(splits["calib"], InputFormat.from_dict(components[0].metadata["input"]))
    fitted = {label: fit_calibration(components, calib, method=method)
              for label, method in (("MDA 2.1 scaling", "mda"), ("calibrated jointly", "joint"),
                                    ("feature head", "head"))}
    variants = {"no scaling": assemble(components),
                **{label: assemble(components, cal) for label, cal in fitted.items()}}
    asm = variants["feature head"]
    asm_path, onnx_path = out / "assembled.mdafx", out / "assembled.onnx"
    artifacts.save(asm, asm_path, overwrite=True)
    report = export_onnx(asm.module, onnx_path, asm.input_format.example(),
                         metadata=asm.metadata, overwrite=True)

    test, rows = splits["test"], []
    for (name, model, fmt, seconds), comp in zip(sources, components):
        rows += _source_rows(name, f"{name} ({seconds:.1f} s training)", model, comp,
                             _dataset(test, fmt))
    shared = _dataset(test, asm.input_format)
    index, positions = _matched(shared, asm.class_names)
    union = [DEMO_CLASSES.index(n) for n in asm.class_names]
    both = f"{len(union)}: both tasks"
    for name, model, fmt, _ in sources:  # what one source model does on the union
        logits, labels = predict(model, batches(_dataset(test, fmt), index, 256))
        rows.append([f"{name} on both tasks", both, len(index),
                     task_accuracy(logits, labels, union), count_params(model)])
    test_batches = functools.partial(batches, shared, index, 256)
    for label, variant in variants.items():
        logits, _ = predict(variant.module, test_batches())
        rows.append([f"assembled, {label}", both, len(index), accuracy(logits, positions),
                     variant.params])
    rows.append(["assembled, feature head, onnxruntime", both, len(index),
                 accuracy(onnxruntime_logits(onnx_path, test_batches()), positions),
                 asm.params])
    return DemoReport(out, rows, str(report), sorted(out.iterdir()),
                      time.perf_counter() - started)


def _source_rows(name: str, label: str, model, comp, test) -> list[list]:
    """The demo table's rows of one source: on all classes, on its task's logits only, and its
    component on the same images."""
    logits, labels = predict(model, batches(test, None, 256))
    index, positions = _matched(test, comp.class_names)
    task = ",".join(comp.class_names)
    comp_logits, _ = predict(comp.module, batches(test, index, 256))
    return [[label, "all 10", len(labels), accuracy(logits, labels), count_params(model)],
            [f"{name} on its task", task, len(index),
             task_accuracy(logits[index], labels[index], comp.classes), None],
            [f"component of {name}", task, len(index), accuracy(comp_logits, positions),
             comp.params]]


# ------------------------------------------------------------------------- on CIFAR-10 images


def _splits_of(data: Path) -> tuple[Path, Path]:
    """``(train, test)`` ImageFolders of ``data``: ``data/{train,test}``, or
    ``data/cifar10/{train,test}`` (the folder ``MDAFX_DATA`` names)."""
    for root in (data, data / "cifar10"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root / "train", root / "test"
    raise DataError(f"{data}: expected train/ and test/ ImageFolders (or cifar10/train and "
                    "cifar10/test) in it, one folder per CIFAR-10 class")


def subset_imagefolder(src: str | os.PathLike, parts: dict[str | os.PathLike, int],
                       classes: list[str], seed: int = 0) -> dict[Path, int]:
    """Copy a seeded sample of every class folder of ``src`` (``classes``, exactly its folders)
    into each folder of ``parts`` (``{dst: per_class}``), disjoint between parts and the files
    unchanged (``dst/<class>/<file>``); returns the images copied per part. A class with fewer
    images fills the parts in order."""
    import random
    import shutil

    src = Path(src)
    folders = sorted(p.name for p in src.iterdir() if p.is_dir())
    if folders != sorted(classes):
        raise DataError(f"{src}: its class folders ({', '.join(folders) or 'none'}) are not "
                        f"the classes of the embedded sources ({', '.join(classes)})")
    copied = {Path(dst): 0 for dst in parts}
    for name in classes:
        files = sorted(p for p in (src / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{src / name}: no image files")
        picked = random.Random(f"{seed}:{name}").sample(files, min(sum(parts.values()),
                                                                   len(files)))
        for dst, n in parts.items():
            taken, picked = sorted(picked[:n]), picked[n:]
            (Path(dst) / name).mkdir(parents=True, exist_ok=True)
            for path in taken:
                shutil.copyfile(path, Path(dst) / name / path.name)
            copied[Path(dst)] += len(taken)
    return copied


def demo_pretrained(data: str | os.PathLike, out: str | os.PathLike | None = None, *,
                    train_per_class: int = 100, test_per_class: int = 100, seed: int = 0,
                    progress: bool = False) -> DemoReport:
    """The demo on the embedded CIFAR-10 sources and ``data`` (module docstring): copies
    ``train_per_class`` training images per class to ``out/data/train`` (analysed; a tenth held
    out for the disassembly search), a fifth as many more to ``out/data/calib`` (assembly's
    logit calibration) and ``test_per_class`` test images to ``out/data/test``, then writes
    both profiles, the two component files, the assembled model and its ONNX file into ``out``
    and scores every model on the test images."""
    from tqdm.auto import tqdm

    from .data import open_images
    from .models import build_source, pretrained_card
    from .profiling import analyse, calibration_split
    from .recipes import disassemble

    started = time.perf_counter()
    train_dir, test_dir = _splits_of(Path(data))
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="mdafx-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    names = pretrained_card(PRETRAINED_TASKS[0][0])["classes"]
    folders = {split: out / "data" / split for split in ("train", "calib", "test")}
    subset_imagefolder(train_dir, {folders["train"]: train_per_class,
                                   folders["calib"]: max(2, train_per_class // 5)}, names, seed)
    subset_imagefolder(test_dir, {folders["test"]: test_per_class}, names, seed)
    per_class = max(1, min(50, train_per_class // 5))  # MDA's 1% of a class is 1 image here

    sources, components = [], []
    bar = tqdm(total=2 * len(PRETRAINED_TASKS) + 1, desc="demo", disable=not progress)
    for k, (spec, task) in enumerate(PRETRAINED_TASKS):
        fmt = InputFormat.from_dict(pretrained_card(spec)["input"])
        gm = build_source(spec, len(names), (), None, fmt)
        bar.set_description(f"analyse {spec}")
        prof = analyse(gm, folders["train"], fmt, per_class=per_class, seed=seed,
                       source={"model": spec, "model_args": [], "weights": None})
        prof.save(out / f"{spec}.profile", overwrite=True)
        bar.update()
        bar.set_description(f"disassemble {spec}")
        calib, calib_idx, _ = calibration_split(prof, None, fmt)
        comp = disassemble(gm, prof, list(task), recipe="default",
                           calibration=(calib, calib_idx), source=spec)
        path = out / f"component{k}_{spec}_{'-'.join(task)}.mdafx"
        artifacts.save(comp, path, overwrite=True, metadata={
            "model": spec, "model_args": [], "weights": None, "num_classes_source": len(names)})
        components.append(artifacts.load_component(path))  # from the file, as assemble does
        sources.append((spec, gm, fmt))
        bar.update()
    bar.set_description("assemble")
    calib = open_images(folders["calib"], InputFormat.from_dict(components[0].metadata["input"]))
    asm = assemble(components, fit_calibration(components, calib))
    asm.metadata["calibration"]["data"] = str(folders["calib"])
    asm_path, onnx_path = out / "assembled.mdafx", out / "assembled.onnx"
    artifacts.save(asm, asm_path, overwrite=True)
    report = export_onnx(asm.module, onnx_path, asm.input_format.example(),
                         metadata=asm.metadata, overwrite=True)
    bar.update()
    bar.close()

    rows = _score_pretrained(sources, components, asm, onnx_path, folders["test"])
    return DemoReport(out, rows, str(report), sorted(p for p in out.iterdir() if p.is_file()),
                      time.perf_counter() - started)


def _score_pretrained(sources, components, asm, onnx_path: Path, test_dir: Path) -> list[list]:
    from .data import open_images

    rows = []
    for (spec, gm, fmt), comp in zip(sources, components):
        rows += _source_rows(spec, spec, gm, comp, open_images(test_dir, fmt))
    shared = open_images(test_dir, asm.input_format)
    index, positions = _matched(shared, asm.class_names)
    folders = list(shared.class_names)
    union = [folders.index(n) for n in asm.class_names]
    both = f"{len(union)}: both tasks"
    for spec, gm, fmt in sources:  # what one source does on the union task
        ds = open_images(test_dir, fmt)
        logits, labels = predict(gm, batches(ds, index, 256))
        rows.append([f"{spec} on both tasks", both, len(index),
                     task_accuracy(logits, labels, union), None])
    logits, _ = predict(asm.module, batches(shared, index, 256))
    rows.append(["assembled, calibrated", both, len(index), accuracy(logits, positions),
                 asm.params])
    rows.append(["assembled, calibrated, onnxruntime", both, len(index),
                 accuracy(onnxruntime_logits(onnx_path, batches(shared, index, 256)), positions),
                 asm.params])
    return rows
