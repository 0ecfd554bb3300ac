"""HELIP's defaults, in one place.

``helip train``'s flags, ``TrainConfig``, ``HardPairBatchSampler.from_hard_pairs``,
``HardNegativeMarginLoss``, ``PartnerMasker`` and the demo all read these
values, so a script built from the library trains the same method as the
command (a test checks they agree). The partner temperature is the setting
that measured best on the built-in world's validation split (relative 0.05,
three seeds; see benchmarks/RESULTS.md); change it here, not in a caller.
"""

# batches (helip.sampler.HardPairBatchSampler)
HARD_PER_TARGET = 1             # hard partners placed beside each target
TOP_K = 50                      # partners drawn from the first TOP_K entries of a target's hard-pair list
HARD_FRACTION = 1.0             # share of a batch's places in target+partner groups (rest: lone targets)
# partners drawn by mining score, P ~ exp((s - s_1) / (T * unit)), the unit set by the mode: "relative" the
# median over targets of the top-k score spread s_1 - s_k (scale-free); "per_target" each target's own spread;
# "absolute" score units. T = 0: uniform (the paper's draw)
HARD_TEMPERATURE = 0.05
HARD_TEMPERATURE_MODE = "relative"

# the hard negative margin loss (helip.losses.HardNegativeMarginLoss)
HNML_WEIGHT = 1.0
HNML_MARGIN = 0.2

# continued training of a real checkpoint (helip train); the demo's tiny model from scratch uses its own values
LR = 1e-5
