"""What every experiment shares: the datasets (:mod:`.input_pipeline`: registry, data order,
batches), the command line (:mod:`.command_line`, :mod:`.accelerator`, :mod:`.cpu_only`),
all-or-nothing writes (:mod:`.storage`), plots (:mod:`.plotting`) and the radius labels of
result files (:mod:`.labels`)."""
