"""What every experiment shares: the datasets (:mod:`.input_pipeline`: registry, data order,
batches), all-or-nothing writes (:mod:`.storage`), plots (:mod:`.plotting`) and the radius
labels of result files (:mod:`.labels`)."""
