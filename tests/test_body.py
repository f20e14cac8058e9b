"""`engines.body.body_mask`: the body without the table, its arms kept (colour, 3D views and metrics use it)."""

from __future__ import annotations

import numpy as np

from napari_ctcolor.engines.body import body_mask


def test_the_table_goes_and_both_arms_stay():
    # 12 slices of 160 x 200 at 1 mm: a trunk ellipse (soft tissue with lungs), an arm disc on each side separated
    # from it by air, and a table below: a 2 mm curved shell of 400 HU, 6 mm under the back, on a foam mattress of
    # -800 HU that touches both.
    y, x = np.mgrid[:160, :200].astype(float)
    hu = np.full((160, 200), -1000.0)
    trunk = ((y - 70) / 45) ** 2 + ((x - 100) / 60) ** 2 < 1
    hu[trunk] = 40
    hu[(((y - 65) / 25) ** 2 + ((x - 75) / 18) ** 2 < 1)] = -850  # a lung: a hole, filled
    arms = [((y - 70) ** 2 + (x - c) ** 2 < 14**2) for c in (20, 180)]
    for arm in arms:
        hu[arm] = 50
    hu[(y > 115) & (y < 122)] = -800  # mattress
    hu[(y >= 122) & (y < 124)] = 400  # table shell
    volume = np.repeat(hu[None], 12, axis=0)
    body = body_mask(volume, (2.0, 1.0, 1.0))
    assert body[:, trunk].all() and all(body[:, arm].all() for arm in arms)
    assert not body[:, 122:124].any()  # the table
    assert not body[:, hu == -1000].any()  # the air


def test_a_single_slice_keeps_its_body():
    hu = np.full((1, 64, 64), -1000.0)
    hu[0, 10:50, 12:52] = 40.0
    body = body_mask(hu, (5.0, 1.0, 1.0))
    assert body[0, 10:50, 12:52].all() and body.sum() == 40 * 40
