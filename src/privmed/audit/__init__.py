"""Privacy audits of trained models: `privmed audit` attacks our own models to measure, empirically,
what the differential-privacy guarantee bounds from above.

`privmed.audit.mia` holds the pure statistics of membership-inference attacks (scores from logits
and shadow/reference-model outputs the caller computed, and their evaluation); it trains nothing.
`privmed.audit.inversion` is the pure gradient-inversion attack on one released update;
`privmed.audit.updates` makes the updates a coordinator sees with privmed's own sites, and
`privmed.audit.inversion_audit` attacks them for `privmed audit --attack inversion`.
"""
