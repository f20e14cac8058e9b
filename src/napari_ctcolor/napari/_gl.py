"""Which OpenGL renderer draws the viewer: a GPU's, or a software rasteriser (Mesa's llvmpipe under a virtual X
server or a remote desktop without a GPU), on which napari's 3D ray casting takes seconds per frame.

``CTCOLOR_SOFTWARE_GL=1`` (or ``0``) overrides what the renderer's name says.
"""

from __future__ import annotations

import functools
import os

#: Substrings of GL_RENDERER that name a software rasteriser (Mesa's llvmpipe, softpipe and swrast, Google's
#: SwiftShader, Windows' GDI and Basic Render drivers).
SOFTWARE_RENDERERS = (
    "llvmpipe",
    "softpipe",
    "swrast",
    "software rasterizer",
    "swiftshader",
    "gdi generic",
    "basic render",
)
ENV = "CTCOLOR_SOFTWARE_GL"


@functools.lru_cache(maxsize=1)
def gl_renderer() -> str:
    """GL_RENDERER of this process's OpenGL, read in the current vispy context (a hidden one made when there is
    none, as napari does to read the GL limits); "" when no context can be made."""
    from vispy.app import Canvas
    from vispy.gloo import gl
    from vispy.gloo.context import get_current_canvas

    try:
        canvas = Canvas(show=False) if get_current_canvas() is None else None
    except Exception:  # noqa: BLE001 - no OpenGL at all: nothing to tell
        return ""
    try:
        return str(gl.glGetParameter(gl.GL_RENDERER) or "")
    finally:
        if canvas is not None:
            canvas.close()


def software_rendering() -> bool:
    """True when a software rasteriser draws (or ``CTCOLOR_SOFTWARE_GL=1``)."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return forced == "1"
    renderer = gl_renderer().lower()
    return any(name in renderer for name in SOFTWARE_RENDERERS)
