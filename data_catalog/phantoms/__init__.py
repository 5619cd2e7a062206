"""Synthetic non-contrast head CT with intracranial haemorrhage (ICH): the project's embedded default dataset.

A phantom is modelled with analytic shapes in a head-centred frame
(mm; x -> patient left, y -> posterior, z -> superior, origin near the lateral ventricles), sampled on a grid of
1 mm sub-slices at the size's in-plane spacing, averaged to 5 mm slices (partial volume), blurred by the scanner
point-spread function, shifted by a per-scan HU offset (+-5) and given correlated noise (white noise blurred
with sigma 0.7 px, 3..6 HU). Outside the circular reconstruction field the image is padded (-2000, -2048 or
-3024). Only blood is labelled. Everything follows from one integer seed: the same seed gives the same arrays
(and the same file bytes from :func:`write_phantom_dataset`); ``small`` and ``full`` of one seed show the same
head and lesions, and ``with_lesion=False`` the same head without them.

Anatomy (HU at the 1 mm build): scalp (skin/muscle 30..55, fat -100..-60, temporalis), skull 5..8 mm (tables
1200..1700, diploe 350..650 with texture), skull base (700..1100; petrous 1300..1800; orbits, ethmoid, frontal,
sphenoid and mastoid air), CSF rim and sulci (2..10), cortical grey ribbon (37..44) over white matter (22..29),
deep grey nuclei, lateral/third/fourth ventricles, falx and tentorium (42..52), brainstem, a denser posterior
fossa (+2..6), basal cisterns and Sylvian fissures, a head rest behind the occiput.

Bleeds (``_plan_lesions``): IPH (lobulated, rough ellipsoid at basal ganglia, thalamus, lobe, cerebellum or pons,
oedema rim 15..24 HU), IVH (dependent layering behind a flat fluid level), SDH (crescent, 3..20 mm, stops at the
falx), EDH (biconvex lens, 10..30 mm), SAH (sulcal ribbons 1.5..3 mm and surface, or basal cisterns). Blood is
52..75 HU (acute), 62..80 (clotted) or 36..46 (hyperacute) with texture; SAH 52..72 before averaging. Mass
effect: midline shift ~1 mm per 10 ml (at most 15 mm), ipsilateral ventricle compression, effaced sulci.
Distractors, never labelled: pineal (70%), choroid plexus (65%) and falx (7%) calcifications, dural sinuses
45..72 HU, a dense artery 62..82 HU in half the cases, and the partial-volume rim at the inner table.

Units: lengths in mm, densities in HU, volumes in ml.

Modules: ``api`` (a phantom from a seed, a data root of phantoms on disk), ``anatomy`` (the head and the
distractors), ``lesions`` (the five bleed types and their planning), ``render`` (sampling, partial volume,
blur, noise), ``geometry`` (sizes, constants, random fields, coordinates, shape primitives).
"""

from data_catalog.phantoms.api import Phantom, generate_phantom, write_phantom_dataset
from data_catalog.phantoms.geometry import PHANTOM_SIZES

__all__ = ["PHANTOM_SIZES", "Phantom", "generate_phantom", "write_phantom_dataset"]
