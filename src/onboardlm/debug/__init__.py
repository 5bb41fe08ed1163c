"""The debugging toolbox: accuracy bisection against transformers and across the runtime's transforms
(:mod:`~onboardlm.debug.accuracy`, :mod:`~onboardlm.debug.transform_bisect`) and decoder-layer
diagrams (:mod:`~onboardlm.debug.viz`). Graph dumps per transform are :mod:`onboardlm.transforms.dump`.
"""
