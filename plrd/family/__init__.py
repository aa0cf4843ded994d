"""``plrd family``: the corpus, evaluation, training, the stages and the schedule of a family."""
