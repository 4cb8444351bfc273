"""Level 2 of the pipeline: which of the text-free candidates the sentence refers to, and how sure the answer is.

- :mod:`custom.referral.query`: the sentence read into a query (organ, place, kind, size, selector).
- :mod:`custom.referral.answer`: the query answered exactly on the candidates' measured attributes.
- :mod:`custom.referral.choose`: the candidates made and measured once per volume, then chosen per expression with
  the learned scorer (:class:`~custom.referral.choose.CandidateReferrald`), or "not present".
- :mod:`custom.referral.confidence`: the answer's probability of being right, calibrated on validation.
- :mod:`custom.referral.training`: the scorer's training, ``python -m custom.referral.training``.
"""
