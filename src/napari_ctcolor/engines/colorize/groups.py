"""The HU groups of the colour classes (bone, blood, organ, plain tissue): how a voxel's own HU re-weighs the classes
that its network pixel holds, so that thin bone in a pixel of muscle is coloured as bone (`HU_GROUPS`)."""

from __future__ import annotations

import functools

import torch

from . import anatomy as _anatomy

#: A network pixel (3.5 mm) mixes the classes of what it holds: a rib's thin cortex with the muscle around it, a
#: vertebra's rim with the vessel beside it; its colour lands between them (thin bone came out salmon, not ivory). Each
#: voxel therefore re-weights its network pixels' classes by whether its own HU fits their group: bone at any HU;
#: contrast-filled blood up to `BLOOD_FADE_HU`, or up to what this scan's own blood shows (`blood_fade`: a CT
#: angiography's aorta and heart reach 500-700 HU, where cortical bone lies too, and there the network's probabilities
#: choose, not the HU); organs (liver, spleen, kidney, bowel, ...: an enhancing kidney cortex reaches 150-250 HU) up to
#: `ORGAN_FADE_HU`; plain tissue (`_PLAIN`: muscle, fat, soft tissue, spinal cord, lung, air) up to `PLAIN_FADE_HU`:
#: skeletal muscle is 40-60 HU and about 80 enhanced, so a 150 HU voxel in a pixel of vertebra and psoas is the
#: vertebra's cancellous bone. The weight falls linearly from the first HU to `GROUP_FLOOR` at the second; a voxel that
#: fits none of its pixels' groups keeps their mix. At or below `PLAIN_FADE_HU[0]` every weight is 1: the network's mix
#: is kept exactly (an osteoporotic vertebra's marrow or an enhancing kidney beside a rib keep the colour the network
#: gave them).
HU_GROUPS = ("bone", "blood", "organ", "plain")
_PLAIN = ("air", "lung", "fat", "soft_tissue", "spinal_cord", "autochthon", "iliopsoas", "gluteus_")
PLAIN_FADE_HU = (110.0, 210.0)
ORGAN_FADE_HU = (200.0, 300.0)
BLOOD_FADE_HU = (400.0, 600.0)
#: Blood may be as bright as the brightest blood the network names in this scan (`Chroma.named_blood_hu`, its
#: `BLOOD_PERCENTILE`: the arteries of an arterial phase, not its less enhanced veins) plus `BLOOD_FADE_ABOVE_HU`: its
#: fade starts there (between `BLOOD_FADE_MIN_HU` and `BLOOD_FADE_MAX_HU`) and ends `BLOOD_FADE_HU`'s width higher;
#: `BLOOD_FADE_HU` when the network names too little blood to tell. Unenhanced blood is 30-60 HU, so in a
#: non-contrast scan a 300-600 HU voxel is bone whatever its pixel's mix (the shipped model, unsure between the hips
#: and the iliac vessels beside them, named 26 % of the non-contrast 3 mm patient's dense pelvic voxels contrast blood
#: with a fixed 400-600 HU fade); a CTA whose aorta is at 600 HU keeps blood up to about 700. With the median instead
#: of the 90th percentile, the aorta of the 600 HU exams was named bone on 56-72 % of its voxels (the veins' 60-120 HU
#: pulled the median down). Checked on the exam rows of the model cards (`training.exams`: each labelled patient's
#: blood at 40-600 HU) and on the unlabelled chest CT's blood pool at 300-600 HU (2026-11-26).
BLOOD_PERCENTILE, BLOOD_FADE_ABOVE_HU, BLOOD_FADE_MIN_HU, BLOOD_FADE_MAX_HU = 90.0, 100.0, 240.0, 800.0


def blood_fade(named_hu: float | None) -> tuple[float, float]:
    """The HU over which contrast blood's weight falls (`HU_GROUPS`), given the `BLOOD_PERCENTILE` of the HU of the
    scan's named blood (`Chroma.named_blood_hu`; None: too little named to tell)."""
    if named_hu is None:
        return BLOOD_FADE_HU
    low = min(max(named_hu + BLOOD_FADE_ABOVE_HU, BLOOD_FADE_MIN_HU), BLOOD_FADE_MAX_HU)
    return (low, low + BLOOD_FADE_HU[1] - BLOOD_FADE_HU[0])


GROUP_FLOOR = 1e-3
#: The HU at which the marrow's and its cortex's groups are weighed (`enclosure.CORTEX_HU`).
MARROW_GROUP_HU = 300.0


def hu_group_weights(
    hu: torch.Tensor, no_bone: torch.Tensor | None = None, blood: tuple[float, float] = BLOOD_FADE_HU
) -> torch.Tensor:
    """(..., 4) weights of the `HU_GROUPS` for voxels of HU ``hu`` (...); bone's is 1, or the floor where ``no_bone``
    (bool, as ``hu``: `Chroma.hu_groups`); blood's falls over ``blood`` (`Chroma.blood_fade_hu`)."""

    def falling(low: float, high: float) -> torch.Tensor:
        return ((high - hu) / (high - low)).clamp(0.0, 1.0) * (1.0 - GROUP_FLOOR) + GROUP_FLOOR

    bone = torch.ones_like(hu) if no_bone is None else 1.0 - no_bone.to(hu.dtype) * (1.0 - GROUP_FLOOR)
    fits = (bone, falling(*blood), falling(*ORGAN_FADE_HU), falling(*PLAIN_FADE_HU))
    return torch.stack(fits, dim=-1)


@functools.lru_cache(maxsize=16)
def hu_group_of(classes: tuple[str, ...]) -> torch.Tensor:
    """(K,) index into `HU_GROUPS` of each class: by its tissue family (`anatomy.family`), plain tissue by name."""
    group = {"bone": 0, "contrast_blood": 1}
    return torch.tensor([3 if name.startswith(_PLAIN) else group.get(_anatomy.family(name), 2) for name in classes])
