"""A hybrid from a trained transformer: the teacher (teacher.py) and the two objectives that learn from it
(objectives.py), run by the normal trainer under `train.objective=align|distill` (docs/distillation.md)."""
