"""mdafx: Model Disassembling and Assembling (MDA) as a torch.fx graph compiler.

The Python API is ``mdafx.api`` (``from mdafx import api``): one function per CLI command
(``analyse``, ``disassemble``, ``assemble``, ``export``, ``evaluate``, ``finetune``, ``inspect``,
``routes``, ``info``, ``demo``) and the building blocks they are made of. This package module
imports nothing heavy, so ``mdafx --help`` starts without loading torch.
"""
from __future__ import annotations

__version__ = "0.2.0"
