"""What the six scripts share and is not their method. The plumbing a copy of a script takes along:
models.py (loading and sampling), task.py (data files, judges, the eval), run.py (the run: process group,
logging, checkpoints). The built-in paint-colour task, loaded only when asked for: colours.py, judges.py,
recipe.py, tasks.py, painter/ (the shipped model) and assets/ (the colour data)."""
