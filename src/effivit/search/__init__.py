"""``effivit search``: a backbone designed for the user's own hardware and latency budget.

EfficientFormer's latency-driven slimming (arXiv:2206.01191, section 4) in four parts:

* :mod:`~effivit.search.space` - the search space (widths, depths, where MB3D blocks may go) and its points;
* :mod:`~effivit.search.latency` - the latency lookup table measured on this machine, and the predictor;
* :mod:`~effivit.search.supernet` - the supernet, trained once with Gumbel-Softmax path sampling;
* :mod:`~effivit.search.slimming` - slimming the supernet until the predicted latency meets the budget;

plus :mod:`~effivit.search.report` (the report) and :mod:`~effivit.search.command` (the command line).
The result is an architecture file for ``create_model("efficientformer_custom", arch=PATH)``.
"""
