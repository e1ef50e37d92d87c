"""The feedback loop: collect ratings and corrections (``store``), curate them
(``curate``), export dataset versions (``export``), retrain, gate and promote
(``retrain``), and the worker that does it continuously (``loop``)."""
