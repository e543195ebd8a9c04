"""The data layer: collections (`sources`, `collection`, `ir_datasets_source`), file formats and
TREC runs (`formats`), training examples (`training`), batches (`assemble`, `pipeline`)."""
