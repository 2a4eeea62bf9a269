"""The GEAR paper's chain-of-thought tasks for lm-eval (YAMLs beside gear_cot.py), importable
as lm_eval_gear.tasks once installed."""
