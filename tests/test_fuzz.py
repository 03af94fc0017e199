"""Fuzzing every file mdafx reads, and its flags: nothing a user passes runs code, corrupts a
result or slips through unnoticed.

For each file type (model file, profile, weights, ONNX) hypothesis draws damaged copies of a
real file: truncations, bit flips, edited JSON fields of the header, swapped tensors, out-of-range
values. Each copy goes through the commands that read that type (in this process, through
``mdafx.cli.main``). Property: the command either succeeds with finite outputs or fails with
exactly one ``mdafx: error:`` line and exit 1 (2 for usage), never a traceback; it writes no
output when it fails; and no payload ever creates the marker file a crafted target would touch.
Bounded: ``MAX_EXAMPLES`` examples per strategy, no deadline.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mdafx import api, cli
from mdafx.models import tiny_cnn

pytestmark = pytest.mark.slow  # a few minutes: outside the fast subset (README)

MAX_EXAMPLES = int(os.environ.get("MDAFX_FUZZ_EXAMPLES", "25"))
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
CLASSES = ("cat", "dog", "frog")
SIZE = 16
MARKER = Path("/tmp/mdafx-fuzz-marker")
PAYLOADS = ["os.system", "subprocess.getoutput", "builtins.eval", "builtins.exec",
            "torch.load", "pickle.loads", "__import__", "importlib.import_module"]


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def check(code: int, err: str, outputs=()) -> None:
    assert not MARKER.exists(), "a payload ran"
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        return
    assert code in (1, 2), (code, err)
    if code == 1:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("mdafx: error: "), err
    for path in outputs:
        assert not Path(path).exists(), f"{path} written by a failing command"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (d / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                d / "data" / name / f"{i}.png")
    model = tiny_cnn(3).eval()
    torch.save(model.state_dict(), d / "w.pt")
    fmt = ["--input-size", str(SIZE), "--mean", "0.5", "--std", "0.25"]
    model_flags = ["--model", "tiny_cnn", "--weights", d / "w.pt", *fmt]
    code, _, err = run("analyse", *model_flags, "--data", d / "data", "--holdout", "0",
                       "--per-class", "2", "-o", d / "p.safetensors")
    assert code == 0, err
    code, _, err = run("disassemble", *model_flags, "--profile", d / "p.safetensors", "--task",
                       "cat,dog", "--recipe", "mda", "-o", d / "c.mdafx")
    assert code == 0, err
    code, _, err = run("export", d / "c.mdafx", "-o", d / "c.onnx")
    assert code == 0, err
    return {"dir": d, "model": d / "c.mdafx", "profile": d / "p.safetensors",
            "weights": d / "w.pt", "onnx": d / "c.onnx", "flags": model_flags}


def header_of(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def with_header(data: bytes, header: dict) -> bytes:
    n, _ = header_of(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


# --------------------------------------------------------------------------------- mutations


@st.composite
def damaged(draw, data: bytes, safetensors: bool = True) -> bytes:
    """A truncation, a few bit flips (in the header of a safetensors file, where it matters, or
    anywhere), or bytes appended."""
    kind = draw(st.sampled_from(["truncate", "flip-header", "flip-any", "append"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    limit = (min(len(data), 8 + header_of(data)[0]) if kind == "flip-header" and safetensors
             else len(data))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, limit - 1))
        out[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                        st.floats(allow_nan=False), st.text(max_size=20),
                        st.sampled_from(PAYLOADS + [f"touch {MARKER}", "$node", "../../etc"]),
                        st.lists(st.integers(-5, 70000), max_size=4))


@st.composite
def edited_json(draw, doc):
    """``doc`` with one field, somewhere in its tree, replaced (or deleted)."""
    doc = json.loads(json.dumps(doc))
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:50]):
                walk(v, path + [i])

    walk(doc, [])
    path = draw(st.sampled_from(paths[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return doc


def edited_metadata_field(data: bytes, field: str, draw) -> bytes:
    _, header = header_of(data)
    meta = header["__metadata__"]
    meta[field] = json.dumps(draw(edited_json(json.loads(meta[field]))))
    return with_header(data, header)


def swapped_tensors(data: bytes, draw) -> bytes:
    _, header = header_of(data)
    names = [k for k in header if k != "__metadata__"]
    a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
    header[a]["data_offsets"], header[b]["data_offsets"] = (header[b]["data_offsets"],
                                                            header[a]["data_offsets"])
    return with_header(data, header)


# --------------------------------------------------------------------------------- the suite


def commands_for_model(files, path):
    out = files["dir"] / "out"
    return [(["info", path], []),
            (["evaluate", path, "--data", files["dir"] / "data"], []),
            (["export", path, "-o", out / "m.onnx", "--no-check"], [out / "m.onnx"]),
            (["assemble", path, files["model"], "-o", out / "a.mdafx"], [out / "a.mdafx"])]


@SETTINGS
@given(data=st.data())
def test_damaged_model_files(files, data):
    raw = files["model"].read_bytes()
    how = data.draw(st.sampled_from(["bytes", "graph", "metadata", "swap"]))
    if how == "bytes":
        bad = data.draw(damaged(raw))
    elif how == "swap":
        bad = swapped_tensors(raw, data.draw)
    else:
        bad = edited_metadata_field(raw, how, data.draw)
    path = files["dir"] / "bad.mdafx"
    path.write_bytes(bad)
    for args, outputs in commands_for_model(files, path):
        code, _, err = run(*args)
        check(code, err, outputs)
        for p in outputs:
            Path(p).unlink(missing_ok=True)


@SETTINGS
@given(data=st.data())
def test_damaged_profiles(files, data):
    raw = files["profile"].read_bytes()
    how = data.draw(st.sampled_from(["bytes", "profile", "swap"]))
    bad = (data.draw(damaged(raw)) if how == "bytes" else swapped_tensors(raw, data.draw)
           if how == "swap" else edited_metadata_field(raw, "profile", data.draw))
    path = files["dir"] / "bad.safetensors"
    path.write_bytes(bad)
    out = files["dir"] / "out" / "c.mdafx"
    for args, outputs in ((["info", path], []),
                          (["disassemble", *files["flags"], "--profile", path, "--task",
                            "cat,dog", "--recipe", "mda", "-o", out], [out])):
        code, _, err = run(*args)
        check(code, err, outputs)
        out.unlink(missing_ok=True)


@SETTINGS
@given(data=st.data())
def test_damaged_weights_and_onnx(files, data):
    bad_w = files["dir"] / "bad.pt"
    bad_w.write_bytes(data.draw(damaged(files["weights"].read_bytes(), False)) if data.draw(
        st.booleans()) else files["weights"].read_bytes()[:data.draw(st.integers(0, 200))])
    flags = [a if a != files["weights"] else bad_w for a in files["flags"]]
    code, _, err = run("evaluate", *flags, "--data", files["dir"] / "data")
    check(code, err)
    onnx_raw = files["onnx"].read_bytes()
    bad_o = files["dir"] / "bad.onnx"
    bad_o.write_bytes(onnx_raw[:data.draw(st.integers(0, len(onnx_raw) - 1))])
    code, _, err = run("info", bad_o)
    check(code, err)


FLAG_VALUES = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "", "abc", "1e-400",
                               "99999999999999999999", "0x10", "#", "1,2,3,4", "-0"])


@SETTINGS
@given(flag=st.sampled_from(["--per-class", "--holdout", "--seed", "--batch-size", "--mean",
                             "--std", "--input-size", "--alpha-conv", "--beta-linear",
                             "--max-drop", "--max-macs", "--threads", "--norm-images"]),
       value=FLAG_VALUES)
def test_bad_flag_values(files, flag, value):
    out = files["dir"] / "out" / "flag.mdafx"
    command = "analyse" if flag in ("--per-class", "--holdout", "--seed", "--batch-size") \
        else "disassemble"
    args = [command, *files["flags"], flag, value]
    if command == "analyse":
        args += ["--data", files["dir"] / "data", "-o", out]
    else:
        args += ["--profile", files["profile"], "--task", "cat,dog", "--recipe", "mda", "-o", out]
    code, _, err = run(*args)
    check(code, err, [out] if code else [])
    out.unlink(missing_ok=True)
