"""The application layer: each user-level job once, called by every front end (``ctcolor`` and ``ctcolor batch``,
the napari widgets, the 3D Slicer logic).

- `colorize`: one ``ctcolor colorize`` run (check outputs, read, colorize, write, ``--classes``, send).
- `register`: one ``ctcolor register`` run (read, register, write OUTDIR, send).
- `peer`: one ``ctcolor peer`` run (a registration peer on a pair, its outputs named as ours).
- `export`: writing a colorized CT as NIfTI, PNG slices or DICOM, keeping or removing the patient's identity, and
  sending it to the CT's PACS (``ctcolor colorize`` and the colorize widget's Export).
- `checkerboard`, `info`: ``ctcolor checkerboard`` and ``ctcolor info``'s record.
- `outputs`: the checks made before any work (an output that is an input, an existing output, a flag without its
  format).
- `batch`: many inputs on Dask distributed, each running the single command's job.
"""
