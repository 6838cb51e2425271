"""The data layer: find containers, discover cases, validate them from metadata, read chunk-aligned units.

    from segcal_cli.io import DataOptions, open_dataset
    with open_dataset(["val.h5"], DataOptions(), require_labels=True) as ds:
        for block in ds.stream():
            ...

See docs/architecture.md for the Block contract.
"""

from segcal_cli.io.cases import CaseInfo
from segcal_cli.io.containers import Container, discover
from segcal_cli.io.dataset import Dataset, open_dataset
from segcal_cli.io.options import DEFAULT_CHUNK_VOXELS, INPUT_KINDS, DataOptions

__all__ = ["CaseInfo", "Container", "DataOptions", "Dataset", "DEFAULT_CHUNK_VOXELS", "INPUT_KINDS",
           "discover", "open_dataset"]
