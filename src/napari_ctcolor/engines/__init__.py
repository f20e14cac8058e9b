"""Engines: the calls behind both the napari widgets and the CLI (batching, devices, progress, cancellation).

Import each engine from its module (`napari_ctcolor.engines.register.register`,
`napari_ctcolor.engines.colorize.colorize`, `napari_ctcolor.engines.checkerboard.checkerboard`): this package
imports none, so that its torch-free modules (`napari_ctcolor.engines.geometry`, `napari_ctcolor.engines.prealign`)
load without torch, as ``ctcolor peer demons`` and the reader child of ``ctcolor register`` need; and ``ctcolor
register`` does not pay the colorizer's imports.
"""
