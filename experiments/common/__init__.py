"""What every experiment shares: the datasets (:mod:`.input_pipeline`: registry, data order,
batches), the command line (:mod:`.command_line`), the accelerator (:mod:`.accelerator`),
signals and failures of an entry point (:mod:`.signals`, :mod:`.entry`), all-or-nothing
writes (:mod:`.storage`), TensorBoard events (:mod:`.summaries`), plots (:mod:`.plotting`)
and the radius labels of result files (:mod:`.labels`)."""
