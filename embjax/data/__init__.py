"""Input pipelines: Fashion-MNIST idx files, tfds datasets, padded and masked batches."""
