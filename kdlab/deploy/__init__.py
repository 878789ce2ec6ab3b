"""The student on the device: export to deployable formats (``kdlab export``) and its model card
(``kdlab card``). Importing the package registers the export formats."""

from kdlab.deploy import onnx_format, torchscript_format
from kdlab.deploy.formats import EXPORT_FORMATS, INT8_MODES, ExportError

__all__ = ["EXPORT_FORMATS", "INT8_MODES", "ExportError", "onnx_format", "torchscript_format"]
