"""One `--help` style for every `meritrun` subcommand: each option shows its default.

argparse's ArgumentDefaultsHelpFormatter, minus the noise: no "(default: None)" or
"(default: False)" for options that are simply off, and nothing added to a help text that
already states its default.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text
