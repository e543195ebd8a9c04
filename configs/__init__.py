"""Experiment configs: `configs/NAME.py` defines `get_config(arg=None)` (big_vision style).

Load one with `--config configs/NAME.py[:ARG]` (ml_collections `config_flags`;
the launchers put the repository root on sys.path, so `import configs.common`
works from a config file) or import it: `from configs import laspar`.
"""
