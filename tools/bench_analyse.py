"""Benchmark ``mdafx analyse``: its floor, one vs two processes, and memory as the data grows.

Every row runs in a fresh subprocess (``python tools/bench_analyse.py --measure ...``), which
reports its time and the peak resident memory (``resource.getrusage(RUSAGE_SELF)``) of the
process that did the work: itself, or under torchrun the largest rank (each rank measures
itself; ``RUSAGE_CHILDREN`` cannot be used: importing torch already starts a 400 MB child).
Rows, on the CIFAR-10 training folder (holdout 0.1, so 50,000 images give a selection pool of
45,000) and on folders of symlinks to its first images for smaller pools
(kept under ``$MDAFX_CACHE/bench_analyse/``, so their decoded ``.npz`` is reused):

* ``inference``: the source model's plain forward passes over the selection pool, from memory
  (the floor: sample selection cannot be cheaper);
* ``analyse``: the command (``seconds`` is what it reports: selection, contributions, digest),
  in memory (the decoded ``.npz`` fast path) with 1 process and with 2 gloo processes
  (``torchrun --nproc-per-node 2``; each gets half the threads), and streamed
  (``--resize 32``: decoded image by image in ``--workers`` DataLoader processes) at both pool
  sizes, so the growth of peak memory with the number of images is visible: the in-memory path
  holds every decoded image, the streamed one only the file list and the labels.

``--model NAME`` is the CIFAR-10 source cached by tools/train_sources.py
(``$MDAFX_CACHE/sources/NAME.pt`` and ``.json``: its factory and kwargs go to the command as
``--model package.module:callable --model-arg K=V ... --weights NAME.pt``), else the embedded
source ``cifar10-NAME`` (no training needed), as tools/common.load_sources does. Example::

    python tools/bench_analyse.py --model resnet20 --sizes 10000,45000 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CIFAR10_CLASSES, ROOT, cache_root, data_root

HOLDOUT = 0.1


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _source(name: str) -> dict:
    """How the command gets source ``name``: ``model`` (the --model spec), ``model_args``
    (``[key, value]`` pairs for --model-arg), ``weights`` (a file or None) and ``source`` (what
    the table says). The cached train_sources.py model if there is one, else the embedded
    ``cifar10-<name>`` (``name`` may already be ``cifar10-<name>``)."""
    from mdafx.models import PRETRAINED

    sources = cache_root() / "sources"
    pt, card = sources / f"{name}.pt", sources / f"{name}.json"
    if pt.is_file() and card.is_file():
        arch = json.loads(card.read_text())["architecture"]
        module_name, factory = arch["factory"].rsplit(".", 1)
        return {"model": f"{module_name}:{factory}",
                "model_args": [[k, v] for k, v in arch["kwargs"].items()],
                "weights": str(pt), "source": f"{name} (cached, {pt})"}
    embedded = name if name in PRETRAINED else f"cifar10-{name}"
    if embedded in PRETRAINED:
        return {"model": embedded, "model_args": [], "weights": None,
                "source": f"{embedded} (embedded)"}
    raise SystemExit(f"{pt} (and {card}) not found and there is no embedded cifar10-{name}: "
                     f"python tools/train_sources.py --models {name}")


def _analyse_args(spec: dict) -> list[str]:
    model = ["--model", spec["model"]]
    for key, value in spec["model_args"]:
        model += ["--model-arg", f"{key}={value!r}"]
    if spec["weights"]:
        model += ["--weights", spec["weights"]]
    args = ["--json", "--threads", str(spec["threads"]), "analyse", *model,
            "--data", spec["folder"], "--holdout", str(HOLDOUT),
            "--batch-size", str(spec["batch_size"]), "--workers", str(spec["workers"]),
            "-o", spec["output"], "--force"]
    return args + (["--resize", "32", "--crop", "32"] if spec["stream"] else [])


def _analyse_here(spec: dict) -> float | None:
    """``mdafx analyse`` in this process; the seconds it reports (None on ranks > 0)."""
    import contextlib
    import io

    from mdafx import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(_analyse_args(spec))
    if code:
        raise SystemExit(f"analyse failed ({code})")
    text = out.getvalue().strip()
    return json.loads(text)["seconds"] if text else None


def measure(spec: dict) -> dict:
    """One row, in this (fresh) process: its seconds and the peak RSS of the process that did
    the work (the largest rank's for torchrun). DataLoader workers are not counted: they are
    forked, and hold one batch beside pages they share with their parent."""
    start = time.perf_counter()
    if spec["kind"] == "inference":
        import torch

        from mdafx.data import CIFAR10_MEAN, CIFAR10_STD, InputFormat, batches, open_images
        from mdafx.data import split_per_class
        from mdafx.evaluation import predict
        from mdafx.models import build_source

        torch.set_num_threads(spec["threads"])
        fmt = InputFormat((32, 32), 3, CIFAR10_MEAN, CIFAR10_STD)
        ds = open_images(spec["folder"], fmt)
        pool = split_per_class(ds.labels.numpy(), [1 - HOLDOUT, HOLDOUT], seed=0)[0]
        gm = build_source(spec["model"], 10, [tuple(a) for a in spec["model_args"]],
                          spec["weights"], fmt)
        t0 = time.perf_counter()
        predict(gm, batches(ds, pool, spec["batch_size"]))
        seconds, rss = time.perf_counter() - t0, _rss_mb()
    elif spec["processes"] == 1:
        seconds, rss = _analyse_here(spec), _rss_mb()
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={spec['processes']}", __file__,
                              "--rank-measure", json.dumps(spec)],
                             capture_output=True, text=True, env=env)
        if run.returncode:
            raise SystemExit(f"torchrun analyse failed:\n{run.stderr[-3000:]}")
        ranks = [json.loads(Path(f"{spec['output']}.rank{r}").read_text())
                 for r in range(spec["processes"])]
        seconds, rss = ranks[0]["seconds"], max(r["rss"] for r in ranks)
    return {"seconds": seconds, "wall": time.perf_counter() - start, "rss": rss}


def rank_measure(spec: dict) -> None:
    """One rank of a torchrun row: analyse, then write this rank's seconds and peak RSS."""
    seconds = _analyse_here(spec)
    Path(f"{spec['output']}.rank{os.environ['RANK']}").write_text(
        json.dumps({"seconds": seconds, "rss": _rss_mb()}))


def _subset(full: Path, pool: int, where: Path) -> Path:
    """A folder of symlinks to the first images of every class of ``full``, enough for a
    selection pool of ``pool`` images after the holdout. ``where`` is a lasting folder (under
    the cache), so that the decoded ``.npz`` of the subset, keyed by the folder's path, is
    reused by the next run instead of left behind for a deleted temporary folder."""
    per_class = math.ceil(pool / (1 - HOLDOUT) / len(CIFAR10_CLASSES))
    out = where / f"train{pool}"
    for name in sorted(p.name for p in full.iterdir() if p.is_dir()):
        (out / name).mkdir(parents=True, exist_ok=True)
        wanted = sorted((full / name).iterdir())[:per_class]
        keep = {f.name for f in wanted}
        for link in (out / name).iterdir():  # links of an earlier, different folder
            if link.name not in keep or link.resolve() != (full / name / link.name).resolve():
                link.unlink()
        for f in wanted:
            link = out / name / f.name
            if not link.is_symlink():
                link.symlink_to(f)
    return out


def _row(spec: dict) -> dict:
    run = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        raise SystemExit(f"{spec['kind']} failed:\n{run.stderr[-3000:]}")
    return {**spec, **json.loads(run.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="folder containing cifar10/ (default: $MDAFX_DATA)")
    ap.add_argument("--model", default="resnet20",
                    help="source cached by tools/train_sources.py, else the embedded "
                         "cifar10-NAME (default %(default)s)")
    ap.add_argument("--sizes", default="10000,45000",
                    help="selection pool sizes (at most 45000; default %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of one process (two processes get half each, at least "
                         "one; default %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers when streamed")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--rank-measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.rank_measure:
        rank_measure(json.loads(args.rank_measure))
        return

    full = data_root(args.data) / "cifar10" / "train"
    source = _source(args.model)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_analyse-") as tmp:
        tmp = Path(tmp)
        subsets = cache_root() / "bench_analyse" / "_".join(full.resolve().parts[1:])
        folders = {n: full if n >= 45000 else _subset(full, n, subsets) for n in sizes}
        base = {**source, "batch_size": args.batch_size,
                "workers": 0, "output": str(tmp / "profile.st"), "stream": False}
        # decode every folder once first, so no row pays for filling the .npz cache
        from mdafx.data import CIFAR10_MEAN, CIFAR10_STD, InputFormat, open_images

        for folder in folders.values():
            open_images(folder, InputFormat((32, 32), 3, CIFAR10_MEAN, CIFAR10_STD))
        big = max(sizes)
        specs = [
            {**base, "kind": "inference", "processes": 1, "threads": args.threads,
             "pool": big, "folder": str(folders[big])},
            {**base, "kind": "analyse", "processes": 1, "threads": args.threads, "pool": big,
             "folder": str(folders[big])},
            {**base, "kind": "analyse", "processes": 2, "threads": max(1, args.threads // 2),
             "pool": big, "folder": str(folders[big])},
        ]
        for n in sizes:
            if n != big:
                specs.append({**base, "kind": "analyse", "processes": 1,
                              "threads": args.threads, "pool": n, "folder": str(folders[n])})
            specs.append({**base, "kind": "analyse", "processes": 1, "threads": args.threads,
                          "pool": n, "folder": str(folders[n]), "stream": True,
                          "workers": args.workers})
        rows = [_row(s) for s in specs]
    from tabulate import tabulate

    floor = rows[0]["seconds"] / rows[0]["pool"]  # seconds per pool image
    table = [[r["kind"], f"{r['processes']} x {r['threads']}", f"{r['pool']:,}",
              f"streamed, {r['workers']} worker(s)" if r["stream"] else "in memory",
              f"{r['seconds']:.1f}", f"{r['seconds'] / (floor * r['pool']):.2f}",
              f"{r['wall']:.1f}", f"{r['rss']:.0f}"] for r in rows]
    print("$ python tools/bench_analyse.py " + " ".join(sys.argv[1:]))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"model {source['source']}, CIFAR-10 train (holdout {HOLDOUT}), batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores (load average {load})")
    print(tabulate(table, headers=["run", "procs x threads", "pool images", "data",
                                   "seconds", "x floor", "wall s", "peak RSS MB"],
                   disable_numparse=True))
    print("x floor: seconds / (inference seconds per pool image x pool images); peak RSS: the "
          "process doing the work (the largest rank), DataLoader workers not counted")


if __name__ == "__main__":
    main()
