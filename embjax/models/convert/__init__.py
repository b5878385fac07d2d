"""Converters: weights read from other frameworks' files (embjax.weights' readers) mapped by name onto
embjax's Flax modules, through one framework (`framework`: a single `WeightMismatchError` collecting every
problem, Keras layer maps, shape checks leaf for leaf against the module, tree flattening). They live
beside the modules they fill, so `embjax.weights` (file readers, the orbax store) never imports a model."""
