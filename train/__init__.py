"""Training the models the project ships (the `toy` world model, train/toy.py).

Sits above `model` and `scheduler`: a training example mirrors a forward the scheduler plans.
"""
