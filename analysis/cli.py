"""What the analysis CLIs share: help that shows each option's default where it has one."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" on every option, except where there is nothing to show
    (None, False, an empty list): those options say what their absence means in their help."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default == []:
            return action.help
        return super()._get_help_string(action)
