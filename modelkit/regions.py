"""How many image regions flow from the detector into ViLBERT.

The released 12-in-1 model was trained on the 100 most confident regions the Visual Genome detector keeps per
image; ViLBERT puts one whole-image region in front of them, so a single image fills 101 visual rows."""

REGIONS_PER_IMAGE = 100
"""Regions the detector keeps per image (the most any image can have)."""

VISUAL_ROWS_PER_IMAGE = 1 + REGIONS_PER_IMAGE
"""Visual rows ViLBERT sees for one image: the whole-image region, then the detected ones."""
