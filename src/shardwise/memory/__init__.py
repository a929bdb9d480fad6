"""Memory per rank: predicted before the run, measured during it, and a budget that is kept.

    predictor = MemoryPredictor(config, corpus, baseline=launcher_baseline())
    print(predictor.predict(config, layout, cuts).describe())   # --dry-run's lines
    check_budget(prediction, memory_budget(config, device, nproc), alternatives)

sizes.py reads "6GiB" (torch-free, for the config); measure.py measures a rank; activations.py
profiles what a model saves by batch shape; batches.py finds each data rank's worst planned
batch; footprint.py builds a rank's base footprint and applies the techniques' costs;
predict.py puts them together; budget.py finds the budget and refuses a run over it, with the
changes alternatives.py finds to fit; record.py writes predicted against measured per rank.
Nothing is imported here, so that the config can read sizes without torch.
"""
