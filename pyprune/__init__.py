"""pyprune: a compiler for CNN compression.

The data path is laid out as packages: ``data`` (load), ``models`` (zoo and
checkpoints), ``ir`` (trace, shape propagation, accounting, pass manager),
``passes`` (transformations), ``train`` (fine-tuning engine), with ``api`` as
the Python entry point and ``cli`` a thin layer over it.
"""

__version__ = "0.1.0"
