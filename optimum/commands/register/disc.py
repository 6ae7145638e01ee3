"""Registers ``optimum-cli export disc`` with optimum's command line.

optimum-cli loads every module of the ``optimum.commands.register`` namespace package and adds
the commands listed in its ``REGISTER_COMMANDS``. This module stays light: the arguments and the
work live in ``optimum_disc.commands.export``, imported when the command runs.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand


class DiscExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="disc",
        help="Compile a BERT-family model into fused Triton kernels with optimum-disc.",
    )

    @staticmethod
    def parse_args(parser):
        from optimum_disc.commands.export import add_arguments

        add_arguments(parser)

    def run(self):
        from optimum_disc.commands.export import run

        code = run(self.args)
        if code:
            raise SystemExit(code)


REGISTER_COMMANDS = [(DiscExportCommand, ExportCommand)]
