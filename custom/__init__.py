"""Python components of the LSMS referring lesion segmentation bundle.

The pipeline answers in two levels, each a room of its own:

- ``detection/`` (level 1, text-free): the slice-wise inferer, whose coarse pass finds the liver before the
  text-free pass over it (``inferers``); the volume-level steps on the network's outputs, the liver region among
  them (``postprocessing``); the lesion candidates and what each one carries (``candidates``); the check that the
  liver found is a liver in view (``scope``). Nothing here reads what the sentence asks.
- ``referral/`` (level 2, over the candidates): reading the sentence into a query (``query``), answering it exactly
  on the candidates' measured attributes (``answer``), choosing the candidates with the learned scorer
  (``choose``), the answer's calibrated confidence (``confidence``), and the scorer's training
  (``python -m custom.referral.training``).

Around them: the network and the scorer's network (``networks/``), data tools and the datalist
(``data/``), clinical input and output (``clinical/``); ``transforms`` and ``augmentation``, ``training``,
``engines``, ``losses``, ``handlers`` and ``metrics``; what a user gives and is told (``user_inputs``, ``options``,
``prompts``, ``text``, ``errors``, ``runtime``); files written whole (``atomic_files``); the bundle's export and
packaging (``export``, ``package``).
"""
