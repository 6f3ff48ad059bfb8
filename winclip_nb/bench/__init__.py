"""Benchmarks (notebook 06): the MVTec-AD / VisA protocol (``protocol``, ``config``,
``loader``), the result store with resume and merge (``store``), tables and figures
(``report``), metrics, the speed harnesses (``speed``, ``methods``) and the anomalib
parity shim (``parity``)."""
