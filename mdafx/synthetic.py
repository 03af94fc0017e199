"""The demo (``mdafx demo``): the whole pipeline on a procedurally generated image set.

Ten synthetic classes (bars, diagonals, outlines, disk, ring, plus, cross, triangle) at 16x16;
two small sources of different architectures and input normalisations are trained, a task is
disassembled from each, logit scales are calibrated on a calibration split, the components are
assembled and exported to ONNX, and every model is scored on a test split.
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
from .assembly import assemble, calibrate
from .data import ArrayDataset, ImageArrays, InputFormat, batches
from .deployment import export_onnx, onnxruntime_logits
from .disassembly import cut
from .evaluation import accuracy, matched_indices, predict, task_accuracy
from .fileio import atomic_output
from .ir import count_params, trace
from .models import resnet_cifar, tiny_cnn
from .profiling import profile
from .training import train_classifier

__all__ = ["DEMO_CLASSES", "DEMO_TASKS", "DemoReport", "demo", "synthetic_shapes"]

DEMO_CLASSES = ("hbar", "vbar", "diag", "anti", "square", "disk", "ring", "plus", "cross", "tri")
DEMO_TASKS = (("disk", "ring", "square"), ("plus", "cross", "tri"))
DEMO_SIZE = 16


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
         train_per_class: int = 150, images: bool = True, progress: bool = False) -> DemoReport:
    """Run the demo into ``out`` (default: a new temporary folder); see the module docstring."""
    from tqdm.auto import tqdm

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
    results, _ = calibrate(components, calib)
    variants = {"no scaling": assemble(components),
                "calibrated": assemble(components, [r.factors for r in results])}
    asm = variants["calibrated"]
    asm.metadata["calibration"] = {"samples": len(calib)}
    asm_path, onnx_path = out / "assembled.mdafx", out / "assembled.onnx"
    artifacts.save(asm, asm_path, overwrite=True)
    report = export_onnx(asm.module, onnx_path, asm.input_format.example(),
                         metadata=asm.metadata, overwrite=True)

    test, rows = splits["test"], []
    for (name, model, fmt, seconds), comp in zip(sources, components):
        ds = _dataset(test, fmt)
        logits, labels = predict(model, batches(ds, None, 256))
        rows.append([f"{name} ({seconds:.1f} s training)", "all 10", len(labels),
                     accuracy(logits, labels), count_params(model)])
        index, positions = _matched(ds, comp.class_names)
        rows.append([f"{name} on its task", ",".join(comp.class_names), len(index),
                     task_accuracy(logits[index], labels[index], comp.classes), None])
        comp_logits, _ = predict(comp.module, batches(ds, index, 256))
        rows.append([f"component of {name}", ",".join(comp.class_names), len(index),
                     accuracy(comp_logits, positions), comp.params])
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
    rows.append(["assembled, calibrated, onnxruntime", both, len(index),
                 accuracy(onnxruntime_logits(onnx_path, test_batches()), positions),
                 asm.params])
    return DemoReport(out, rows, str(report), sorted(out.iterdir()),
                      time.perf_counter() - started)
