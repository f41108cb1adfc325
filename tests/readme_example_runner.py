"""Runs a Python file in a fresh interpreter (used to run the README example verbatim)."""

import runpy
import sys

runpy.run_path(sys.argv[1], run_name="__main__")
