"""The ``jacpipe`` command line (Typer); the logic lives in the layers below."""

from pipeline.cli.app import app as app
from pipeline.cli.app import main as main
