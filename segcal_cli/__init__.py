"""segcal: post-hoc calibration for semantic segmentation, streamed over HDF5 and Zarr.

The package is layered so that data flows one way:

    io (containers, cases, blocks)  ->  engine (stream blocks to the device)
        ->  calibrators / fitting / metrics  ->  commands + report (typer, rich)

Nothing here imports torch at module level except the numeric layers, so `segcal --help` stays fast.
"""

__version__ = "0.1.0"
