"""CLI command modules; each exposes register(app). Listed in the order shown by --help."""

import importlib

NAMES = [
    "phantom", "data_check", "train", "synth", "export", "evaluate_synth", "cv_evaluate", "scenes", "segment",
    "traverse", "anomaly", "denoise", "report", "info",
]

COMMANDS = [importlib.import_module(f"medgen.cli.commands.{name}") for name in NAMES]
