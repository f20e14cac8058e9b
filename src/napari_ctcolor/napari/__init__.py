"""The napari front end: reader, writer, sample data and widgets, thin wrappers over the jobs of `napari_ctcolor.app`.

Heavy logic lives in the layers below; nothing here is imported by them.
"""
