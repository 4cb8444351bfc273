"""Level 1 of the pipeline, text-free: where the liver is, what in it may be a lesion, and whether it is a liver.

- :mod:`custom.detection.inferers`: slice-by-slice inference over a volume; a coarse pass finds the liver, the
  text-free pass runs on the box around it, the network's referring pass only where lesion candidates can be.
- :mod:`custom.detection.postprocessing`: volume-level steps on the network's outputs (the channels split, the
  liver region, the text-free outputs once per volume, answers brought back to the input grid).
- :mod:`custom.detection.candidates`: the lesion candidates of a volume and the attributes each one carries.
- :mod:`custom.detection.scope`: whether the organ the network calls liver is plausibly a liver in view.

Nothing here reads what the sentence asks (that is :mod:`custom.referral`, which this room never imports).
"""
