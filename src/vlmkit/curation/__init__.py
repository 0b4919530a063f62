"""Data curation: score, filter and deduplicate a pool of image-text pairs with a model, write the kept
subset and a report (`vlmkit data filter`). It runs models, so it sits above them (data/ stays a leaf)."""
