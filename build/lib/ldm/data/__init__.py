"""Data: the built-in shapes set, shard I/O and the WebDataset DataModules."""
from ldm.data.shapes import (
    COLORS,
    NUM_CLASSES,
    POSITIONS,
    SHAPES,
    class_index,
    render_sample,
    write_shapes,
)
from ldm.data.webdataset import ShapesDataModule, WebDataModule

__all__ = [
    "COLORS", "NUM_CLASSES", "POSITIONS", "SHAPES", "class_index", "render_sample", "write_shapes",
    "ShapesDataModule", "WebDataModule",
]
