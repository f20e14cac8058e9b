"""The napari front end: reader, writer, sample data and widgets, thin wrappers over `napari_ctcolor.engines`.

Heavy logic lives in the layers below; nothing here is imported by them.
"""
