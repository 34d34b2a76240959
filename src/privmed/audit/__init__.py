"""Privacy audits of trained models: `privmed audit` attacks our own models to measure, empirically,
what the differential-privacy guarantee bounds from above.

`privmed.audit.mia` holds the pure statistics of membership-inference attacks (scores from logits
and shadow/reference-model outputs the caller computed, and their evaluation); it trains nothing.
"""
