"""Command line: ``pyprune info | eval | train | opt | compile | export-onnx | inspect
| passes | models``. A thin layer over :mod:`pyprune.api`: one module per subcommand
(parse, call the API, present), shared argument groups in :mod:`.args`, tables in
:mod:`.present`, the program in :mod:`.app`."""

from .app import EXIT_UNVERIFIED, build_parser, main

__all__ = ["EXIT_UNVERIFIED", "build_parser", "main"]
