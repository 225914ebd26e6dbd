"""CLI command modules; each exposes register(app). Listed in the order shown by --help."""

import importlib

NAMES = ["info", "data_check", "scenes", "segment", "phantom", "train", "synth", "evaluate_synth", "cv_evaluate"]

COMMANDS = [importlib.import_module(f"cli.commands.{name}") for name in NAMES]
