"""The `finetune` flow (flow.py) and the training code it runs (train.py, data.py, backends.py)."""
