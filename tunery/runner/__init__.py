"""Running the stages: pipeline steps shared by `tunery run` and the flows, the DVC worker,
the stage journal, the landing folder of retraining."""
