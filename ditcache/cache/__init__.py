"""Feature caches: the contract, AdaTaylorCache, the calibrator and the factory."""
