"""Converters: weights read from other frameworks' files (embjax.weights' readers) mapped by name onto
embjax's Flax modules, every problem collected into one `framework.WeightMismatchError` (embjax.models.convert.framework) and every
tree checked leaf for leaf against the module's shapes. They live beside the modules they fill, so
`embjax.weights` (file readers, the orbax store) never imports a model."""
