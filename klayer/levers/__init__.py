"""Training levers beyond the core: augmentation (flips, translations, jitter, MixUp,
CutMix), whitening, the weights' moving average (EMA), test-time flip averaging and
batch-norm statistics recomputed after training (PreciseBN)."""
