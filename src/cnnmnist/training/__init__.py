"""The training side: a run as named steps (training.steps), the loop and input pipeline,
callbacks, resume state, distribution and runtime. Imports TensorFlow: the commands that
train import it, nothing at start-up."""

from cnnmnist.training.steps import Options, TrainingDiverged, TrainResult, run

__all__ = ["Options", "TrainResult", "TrainingDiverged", "run"]
