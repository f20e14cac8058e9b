"""The application layer: each user-level job once, called by every front end (``ctcolor`` and its batch,
the napari widgets, the 3D Slicer logic).

- `colorize`: one ``ctcolor colorize`` run (check outputs, read, colorize, write, ``--classes``, send).
- `register`: one ``ctcolor register`` run (read, register, write OUTDIR, send).
- `peer`: one ``ctcolor peer`` run (a registration peer on a pair, its outputs named as ours).
- `export`: writing a colorized CT as NIfTI, PNG slices or DICOM, keeping or removing the patient's identity, and
  sending it to the CT's PACS (``ctcolor colorize`` and the colorize widget's Export).
- `checkerboard`, `info`: ``ctcolor checkerboard`` and ``ctcolor info``'s record.
- `outputs`: the checks made before any work (an output that is an input, an existing output, a flag without its
  format).
- `colorize_job`, `register_job` and their sessions: the requests checked once and the jobs as generators of
  progress steps, which the commands above, the widgets and the Slicer logic run; `window`, `vessels`, `reading`,
  `training`, `warmup`: the other jobs of the table in docs/architecture.md.

The commands take typed tasks (``ColorizeTask``, ...) and print nothing: the CLI and ``ctcolor batch`` (`cli.batch`)
tell the user.
"""
