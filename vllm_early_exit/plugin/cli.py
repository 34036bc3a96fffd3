"""The ``vllm serve`` flags: ``--enable-early-exit`` and ``--early-exit-config``.

``EngineArgs.add_cli_args`` / ``from_cli_args`` are wrapped (by ``hooks.install_hooks``)
to add the flags and to turn them into the ``early_exit`` entry of
``additional_config``. vLLM builds the ``serve`` parser after loading plugins, so
the flags show in ``--help``.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Any

from vllm_early_exit.config import (
    ADDITIONAL_CONFIG_OPTION,
    CONFIG_KEY,
    EARLY_EXIT_CONFIG_OPTION,
    ENGINE_SETTINGS,
    EarlyExitConfig,
    EarlyExitConfigError,
)


def wants_early_exit(additional_config: Any) -> bool:
    return isinstance(additional_config, dict) and CONFIG_KEY in additional_config


# The settings this process read from its command line, and the option that gave them.
_from_command_line: tuple[str, Any] | None = None


def settings_source(additional_config: Any) -> str:
    """Where the ``early_exit`` entry of ``additional_config`` came from, for error messages:
    the command-line option that gave it in this process, or the engine settings."""
    settings = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if _from_command_line is not None and settings == _from_command_line[1]:
        return _from_command_line[0]
    return ENGINE_SETTINGS


CLI_HELP = {
    "--enable-early-exit": (
        "Serve the model with early exit (vllm-early-exit plugin): pure-decode steps may "
        "leave the layer stack after a confident check layer. LLaMA and Qwen2 models only."
    ),
    "--early-exit-config": (
        "Early-exit settings as inline JSON or the path of a JSON file, e.g. "
        '\'{"signal": "max_prob", "threshold": 0.9, "min_layer": 20}\'. Implies '
        "--enable-early-exit. Same schema as the offline additional_config "
        '{"early_exit": {...}}; keys: ' + ", ".join(f.name for f in fields(EarlyExitConfig)) + "."
    ),
}


def _wrap_add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        group = parser.add_argument_group(
            "EarlyExit", "Early-exit decoding (vllm-early-exit plugin). See its README."
        )
        group.add_argument(
            "--enable-early-exit", action="store_true", default=False, help=CLI_HELP["--enable-early-exit"]
        )
        group.add_argument("--early-exit-config", default=None, help=CLI_HELP["--early-exit-config"])
        return parser

    add_cli_args.__early_exit_hook__ = True
    return add_cli_args


def settings_from_cli(args) -> dict[str, Any] | None:
    """The ``early_exit`` settings that ``--enable-early-exit``/``--early-exit-config`` ask for."""
    value = getattr(args, "early_exit_config", None)
    if value is not None:
        return EarlyExitConfig.from_cli_value(value, EARLY_EXIT_CONFIG_OPTION)
    return {} if getattr(args, "enable_early_exit", False) else None


def _wrap_from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args, *rest, **kwargs):
        global _from_command_line
        given = getattr(args, "additional_config", None)
        if wants_early_exit(given):
            _from_command_line = (ADDITIONAL_CONFIG_OPTION, given[CONFIG_KEY])
        settings = settings_from_cli(args)
        if settings:
            _from_command_line = (EARLY_EXIT_CONFIG_OPTION, settings)
        if settings is not None:
            additional = dict(getattr(args, "additional_config", None) or {})
            if CONFIG_KEY in additional and additional[CONFIG_KEY] != settings and settings:
                raise EarlyExitConfigError(
                    "early-exit settings given twice: in --additional-config and in "
                    "--early-exit-config. Use one of them."
                )
            additional.setdefault(CONFIG_KEY, settings)
            args.additional_config = additional
        if wants_early_exit(getattr(args, "additional_config", None)):
            from vllm_early_exit.plugin.metrics import enable_server_metrics

            enable_server_metrics()
        return original.__func__(cls, args, *rest, **kwargs)

    from_cli_args.__early_exit_hook__ = True
    return classmethod(from_cli_args)
