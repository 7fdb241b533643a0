"""Training: ``NucleusTrainer`` (:mod:`.trainer`), mixed precision (:mod:`.amp`), clipping (:mod:`.optim`),
hooks (:mod:`.hooks`) and the ``nucleus-train`` job (:mod:`.job`)."""
