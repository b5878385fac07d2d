"""Converters: weights read from other frameworks' files (embjax.weights' readers) mapped by name onto
embjax's Flax modules, every problem collected into one `embjax.weights.h5.WeightMismatchError` and every
tree checked leaf for leaf against the module's shapes. They live beside the modules they fill, so
`embjax.weights` (file readers, the orbax store) never imports a model."""
