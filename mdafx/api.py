"""The Python API: one function per CLI command, and the building blocks they are made of.

Re-exports only (nothing is defined here). Each ``mdafx <command>`` parses its flags, calls the
same-named function below and prints what it returns:

=============  ==========================================================================
``analyse``    model + labelled images -> :class:`Profile` (MDA §1.1-1.2), calibration split held out
``disassemble`` source graph + profile + task -> :class:`Component` (§1.3-1.4; thresholds or a budget)
``assemble``   components -> :class:`Assembled` (§2: parallel or merged layout; a feature head or calibrated logits)
``export``     component / assembled model -> ONNX file checked against onnxruntime
``evaluate``   model + labelled images -> per-class accuracy, optionally beside its source
``finetune``   component / assembled model + images -> the same architecture, distilled
``inspect``    a pipeline run -> one dump per pass
``routes``     source + profile + two classes -> decision routes (§4)
``info``       any mdafx file (profile, component, assembled model, ONNX) -> what it holds
``demo``       nothing -> the whole pipeline on synthetic data
=============  ==========================================================================
"""
from __future__ import annotations

from . import artifacts
from .artifacts import info, load, load_component, save
from .assembly import (CALIBRATIONS, Assembled, Calibration, InputAdapter, assemble, calibrate,
                       calibrate_jointly, fit_calibration, guard_assembled)
from .data import ArrayDataset, InputFormat, load_imagefolder, open_images, split_per_class
from .decision_routes import Routes, routes
from .deployment import (ExportReport, export, export_onnx, export_pt2, onnx_latency,
                         read_onnx_metadata, read_pt2_metadata)
from .diagnosis import LayerRow, accuracy_by_layer
from .disassembly import (Component, channel_groups, cut, locate, prune, resolve_classes,
                          source_analyses)
from .distillation import FinetuneReport, distill, finetune
from .evaluation import EvaluationReport, GuardReport, evaluate, guard, predict, task_accuracy
from .inspection import InspectReport, inspect
from .ir import count_macs, count_params, trace
from .modelfile import load_model, save_model
from .models import build_model, load_weights, pretrained, pretrained_card
from .passes.locate import ChannelMasks, Thresholds
from .passes.prune_channels import ChannelPlan, masked_model, plan_from_votes, plan_random
from .passes.reestimate_norms import reestimate_batch_norms
from .profiling import Profile, analyse, build_profile, calibration_split, profile
from .recipes import RECIPES, Recipe, disassemble
from .search import Budget, Recovery, SearchResult, search_thresholds
from .synthetic import demo

__all__ = [
    # commands
    "analyse", "disassemble", "assemble", "export", "evaluate", "finetune", "inspect", "routes",
    "info", "demo",
    # results and files
    "Profile", "Component", "Assembled", "SearchResult", "EvaluationReport", "FinetuneReport",
    "ExportReport", "InspectReport", "Routes", "artifacts", "load", "load_component", "save",
    "load_model", "save_model",
    # building blocks
    "trace", "channel_groups", "profile", "build_profile", "locate", "cut", "prune",
    "resolve_classes", "source_analyses", "calibration_split", "calibrate", "calibrate_jointly",
    "fit_calibration", "Calibration", "CALIBRATIONS", "guard_assembled", "search_thresholds",
    "reestimate_batch_norms", "distill", "export_onnx", "export_pt2", "onnx_latency",
    "read_onnx_metadata", "read_pt2_metadata", "pretrained", "pretrained_card",
    "predict", "task_accuracy", "build_model", "load_weights", "count_params", "count_macs",
    "accuracy_by_layer", "LayerRow", "Budget", "Recovery", "Recipe", "RECIPES", "guard", "GuardReport", "Thresholds", "ChannelMasks", "ChannelPlan", "plan_from_votes", "plan_random",
    "masked_model", "InputFormat", "InputAdapter", "ArrayDataset", "load_imagefolder",
    "open_images", "split_per_class",
]
