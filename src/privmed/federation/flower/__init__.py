"""privmed on Flower (flwr): the only package that imports flwr.

- `messages`: what travels between the coordinator and a site (training instructions, updates).
- `site_app`: the site's side (a Flower ClientApp around `privmed.federation.site.Site`).
- `secagg`: SecAgg+ rounds (Flower's SecAggPlusWorkflow and secaggplus_mod) and an in-memory
  Flower Grid, so the in-process runner runs the very same protocol in one process.
- `coordinator`: the coordinator's side (a Flower ServerApp driving the shared round loop).
- `deploy`: certificates, keys, and the SuperLink / SuperNode / `flwr run` processes.
- `warm_clientapp` (with `clientapp_launcher`) and `flower_patch`: Flower's ClientApps forked with
  Flower already imported, and the few waits Flower 1.41.0 hard-codes, shortened.
- `trace`: timestamps of a message's path (PRIVMED_FLOWER_TRACE), for benchmarks/flower_breakdown.py.
"""
