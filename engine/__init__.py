"""The engine process: runs the scheduler's plans on the model and owns every tensor."""
