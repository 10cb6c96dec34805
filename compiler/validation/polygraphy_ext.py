"""The `polygraphy run` plugin: `--qcompile --qcompile-engine ENGINE` runs a qcompile engine as a runner.

Registered through the `polygraphy.run.plugins` entry point (pyproject.toml), e.g.::

    polygraphy run model.onnx --onnxrt --qcompile --qcompile-engine model.engine \\
        --input-shapes input_ids:[2,16] --val-range input_ids:[0,511] --atol 1e-2 --rtol 1e-2

The positional model is the reference for `--onnxrt`; the engine comes from `--qcompile-engine`.
"""
from __future__ import annotations

from polygraphy.logger import G_LOGGER
from polygraphy.tools.args import util as args_util
from polygraphy.tools.args.base import BaseRunnerArgs
from polygraphy.tools.script import make_invocable


class QcompileRunnerArgs(BaseRunnerArgs):
    """
    qcompile Runner: running inference with a qcompile engine
    """

    def get_name_opt_impl(self):
        return "qcompile", "qcompile"

    def get_extra_help_text_impl(self):
        return "Needs --qcompile-engine."

    def add_parser_args_impl(self):
        self.group.add_argument("--qcompile-engine", metavar="PATH", default=None,
                                help="The qcompile engine file to run with --qcompile (see `qcompile build`).")

    def parse_impl(self, args):
        """
        Parses command-line arguments and populates the following attributes:

        Attributes:
            engine (str): Path to the qcompile engine, or None.
        """
        self.engine = args_util.get(args, "qcompile_engine")

    def add_to_script_impl(self, script):
        if self.engine is None:
            G_LOGGER.critical("--qcompile needs the engine file to run: add --qcompile-engine PATH")
        from qcompile.engine import read_manifest
        from qcompile.errors import EngineError

        try:
            read_manifest(self.engine)  # a missing or unreadable file: one clear line, not a traceback
        except EngineError as exc:
            G_LOGGER.critical(f"--qcompile-engine: {exc}")
        script.add_import(imports=["QcompileRunner"], frm="qcompile.validation.runners")
        script.add_runner(make_invocable("QcompileRunner", self.engine))


def export_argument_groups():
    """The `polygraphy.run.plugins` entry point: the argument groups this plugin adds to `polygraphy run`."""
    return [QcompileRunnerArgs()]
